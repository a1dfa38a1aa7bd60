"""One progress display for a whole study: a bar of tasks done / total with the elapsed time and an
estimate of the time left, and beneath it one bar per running task (epochs, lesions, images)."""

from __future__ import annotations

import sys


class StudyProgress:
    def __init__(self, total: int, *, enabled: bool = True, desc: str = "study"):
        self.enabled = enabled
        self._bars: dict[str, object] = {}
        self._positions: dict[str, int] = {}
        self._free: list[int] = []
        self._next_position = 1
        self._overall = None
        if enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self._overall = tqdm(total=total, desc=desc, unit="task", file=sys.stderr, position=0, dynamic_ncols=True,
                                 bar_format="{desc}: {n_fmt}/{total_fmt} tasks |{bar}| elapsed {elapsed}, "
                                            "about {remaining} left")

    def started(self, task_id: str) -> None:
        if not self.enabled or task_id in self._bars:
            return
        position = self._free.pop(0) if self._free else self._next_position
        if position == self._next_position:
            self._next_position += 1
        self._bars[task_id] = self._tqdm(total=None, desc=f"  {task_id}", file=sys.stderr, position=position,
                                         leave=False, dynamic_ncols=True)
        self._positions[task_id] = position

    def update(self, task_id: str, what: str, n: int) -> None:
        bar = self._bars.get(task_id) if self.enabled else None
        if bar is None:  # a message that arrived after its task finished
            return
        if what == "total":
            bar.reset(total=n)
        else:
            bar.update(n)

    def finished(self, task_id: str, *, cached: bool = False) -> None:
        if not self.enabled:
            return
        bar = self._bars.pop(task_id, None)
        if bar is not None:
            self._free.append(self._positions.pop(task_id))
            self._free.sort()
            bar.close()
        self._overall.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        self._overall.close()


__all__ = ["StudyProgress"]
