"""Open an HTML file in headless Debian chromium: console messages, image status, screenshot."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
# Hooks run before anything else on the page: record errors (script errors, failed resources,
# console.error/warn) and, after load, write image status and errors into the title.
_PROBE = """<script>(function(){var errs=[];window.addEventListener('error',function(e){
errs.push('error: '+(e.message||((e.target&&(e.target.src||e.target.href))||'').slice(0,80)));},true);
['error','warn'].forEach(function(k){var o=console[k];console[k]=function(){errs.push('console.'+k+': '+
Array.prototype.join.call(arguments,' '));return o.apply(console,arguments);};});
window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);
var bad=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0&&i.naturalHeight>0);}).map(function(i){return i.alt;});
document.title='MODLENS-PROBE '+JSON.stringify({n_images:imgs.length,broken:bad,errors:errs});});})();</script>"""


def _run(args: list[str], tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def console_lines(page: Path, tmp: Path, screenshot: Path, size=(1280, 2400)) -> list[str]:
    """Load ``page`` unmodified with chromium's logging on and take a screenshot; return every
    console message chromium logged (a report without scripts should log none)."""
    res = _run(["--enable-logging=stderr", "--v=0", f"--window-size={size[0]},{size[1]}",
                f"--screenshot={screenshot}", page.resolve().as_uri()], tmp)
    if res.returncode != 0 or not screenshot.is_file():
        raise RuntimeError(f"chromium failed (rc {res.returncode}): {res.stderr[-2000:]}")
    return [l for l in res.stderr.splitlines() if ":CONSOLE" in l]


def probe(page: Path, tmp: Path) -> dict:
    """Load a copy of ``page`` with the probe script injected first in <head>; return
    {"n_images", "broken", "errors"} as the page saw them after its load event."""
    text = page.read_text(encoding="utf-8")
    copy = tmp / f"probe-{page.name}"
    copy.write_text(re.sub(r"<head>", "<head>" + _PROBE, text, count=1), encoding="utf-8")
    res = _run(["--virtual-time-budget=10000", "--dump-dom", copy.resolve().as_uri()], tmp)
    m = re.search(r"<title>MODLENS-PROBE (.*?)</title>", res.stdout, re.S)
    if m is None:
        raise RuntimeError(f"the probe did not report (rc {res.returncode}); chromium stderr: {res.stderr[-2000:]}")
    return json.loads(html.unescape(m.group(1)))


def n_colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    return len(colours) if colours is not None else 1 << 20
