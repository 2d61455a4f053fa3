"""The result of a validation run: per-method scores, their figure and their tables."""
from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


@dataclass
class ValidationResult:
    """Scores in percent. methods[name]: "layers", "pointing_game" / "mass_in_box" ([per layer] or a float for
    layer-less maps), "best_layers", "best_pointing_game", "best_mass_in_box", "n_samples", "per_family"
    ({family: {"n", "pointing_game", "mass_in_box"}} at the best layers), "per_question" ({"question",
    "family", "pointing_game"}: lists in sample order; a method run on fewer samples has the first ones)."""

    backbone: str
    n_samples: int
    methods: dict[str, dict]
    baselines: dict[str, float]  # random_cell, random_object
    meta: dict = field(default_factory=dict)  # selection rules, counts, each method's settings

    def to_json(self) -> dict:
        def entry(m: dict) -> dict:
            per_layer = None if not m["layers"] else {
                "layers": m["layers"], "pointing_game": [round(v, 2) for v in m["pointing_game"]],
                "mass_in_box": [round(v, 2) for v in m["mass_in_box"]]}
            families = {family: {"n": v["n"], "pointing_game": round(v["pointing_game"], 2),
                                 "mass_in_box": round(v["mass_in_box"], 2)} for family, v in m["per_family"].items()}
            return {"pointing_game": round(m["best_pointing_game"], 2), "mass_in_box": round(m["best_mass_in_box"], 2),
                    "best_layers": m["best_layers"], "per_layer": per_layer, "per_family": families,
                    "per_question": [round(v, 2) for v in m["per_question"]["pointing_game"]]}
        return {"backbone": self.backbone, "n_samples": self.n_samples, "questions": self.questions(),
                "methods": {name: entry(m) for name, m in self.methods.items()},
                "baselines": {k: round(v, 2) for k, v in self.baselines.items()}, "meta": self.meta}

    def questions(self) -> list[dict]:
        """The scored questions in sample order ({"question", "family"}), as the method run on most samples has them."""
        if not self.methods:
            return []
        longest = max((m["per_question"] for m in self.methods.values()), key=lambda q: len(q["question"]))
        return [{"question": q, "family": f} for q, f in zip(longest["question"], longest["family"])]

    def misses(self) -> list[tuple[int, dict[str, float | None]]]:
        """(sample index, {method: pointing game % at its best layers, None where not run}) for every question
        some method scores under 100 on — the questions that tell the methods apart."""
        rows = []
        for i in range(len(self.questions())):
            scores = {name: (m["per_question"]["pointing_game"][i] if i < len(m["per_question"]["pointing_game"])
                             else None) for name, m in self.methods.items()}
            if any(v is not None and v < 100 - 1e-9 for v in scores.values()):
                rows.append((i, scores))
        return rows

    def plot(self, ax=None):
        """Per-layer pointing game per method; layer-less methods and random baselines as horizontal lines."""
        fig, ax = (plt.subplots(figsize=(7, 4)) if ax is None else (ax.figure, ax))
        for i, (name, m) in enumerate(self.methods.items()):
            if m["layers"]:
                ax.plot(m["layers"], m["pointing_game"], marker="o", ms=3, label=name, color=f"C{i}")
            else:
                ax.axhline(m["pointing_game"], ls="--", lw=1.2, label=name, color=f"C{i}")
        for (name, value), style in zip(self.baselines.items(), (":", "-.")):
            ax.axhline(value, ls=style, color="grey", lw=1, label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="LM layer", ylabel="pointing game (%)", ylim=(0, 100),
               title=f"{self.backbone}: does the map point at the asked-about object? (n={self.n_samples})")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        return fig

    def table_markdown(self) -> str:
        lines = [f"### {self.backbone}: ground-truth validation ({self.n_samples} samples)", "",
                 "| method | best layers | pointing game % | mass in box % | samples |", "|---|---|---:|---:|---:|"]
        for name, m in self.methods.items():
            band = f"{m['best_layers'][0]}–{m['best_layers'][-1]}" if m["best_layers"] else "—"
            lines.append(f"| {name} | {band} | {m['best_pointing_game']:.1f} | {m['best_mass_in_box']:.1f} "
                         f"| {m['n_samples']} |")
        for name, value in self.baselines.items():
            lines.append(f"| {name} (baseline) | — | {value:.1f} | — | {self.n_samples} |")
        families = sorted({f for m in self.methods.values() for f in m["per_family"]})
        counts = {f: max(m["per_family"].get(f, {}).get("n", 0) for m in self.methods.values()) for f in families}
        lines += ["", "Pointing game % per question family, at each method's best layers (samples; a method run on",
                  "fewer, such as the causal one, gives its own count):", "",
                  "| method | " + " | ".join(f"{f} ({counts[f]})" for f in families) + " |",
                  "|---|" + "---:|" * len(families)]

        def cell(m: dict, family: str) -> str:
            if family not in m["per_family"]:
                return "—"
            score = m["per_family"][family]
            return f"{score['pointing_game']:.1f}" + ("" if score["n"] == counts[family] else f" ({score['n']})")

        for name, m in self.methods.items():
            lines.append(f"| {name} | " + " | ".join(cell(m, f) for f in families) + " |")
        questions = self.questions()
        lines += ["", "Questions some method misses: pointing game % at each method's best layers (· = 100, a blank",
                  "= not run on that question):", "",
                  "| # | family | question | " + " | ".join(self.methods) + " |",
                  "|---:|---|---|" + "---:|" * len(self.methods)]
        for i, scores in self.misses():
            shown = ["" if v is None else "·" if v >= 100 - 1e-9 else f"{v:.0f}" for v in scores.values()]
            lines.append(f"| {i} | {questions[i]['family']} | {questions[i]['question']} | " + " | ".join(shown) + " |")
        return "\n".join(lines) + "\n"
