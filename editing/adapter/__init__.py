"""VisEdit's adapter: VEAD + IM (+ the scene gate), its hooks, its split forward and `VisEditEditor`."""
