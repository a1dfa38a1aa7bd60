

# ----- a gated MLP whose maps each clamp their input (Gemma-4's clipped Linears) -----------------------
class ClampedGLU(nn.Module):
    def __init__(self, d=8, h=6, tokens=4):
        super().__init__()
        self.norm, self.tok = nn.LayerNorm(d), nn.Linear(tokens, tokens)
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.embed, self.head = nn.Linear(6, d), nn.Linear(d, 4)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.tok(x.transpose(1, 2)).transpose(1, 2)
        h = self.norm(x)
        g = self.gate(h.clamp(-3.0, 3.0))   # each map clamps its own copy of the input
        u = self.up(h.clamp(-2.5, 2.5))
        x = x + self.down(F.gelu(g) * u).clamp(-4.0, 4.0)
        return self.head(x.mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_gate_and_value_reading_the_stream_through_their_own_clamps_are_one_glu(capture):
    torch.manual_seed(0)
    a = _oracle_check(ClampedGLU(), (4, 6), capture=capture)
    assert a.layer_names == ["gate"] and a.structure.mlps[0].up.target == "up"
