"""The edit command's report: ``results.md`` from the results dict ``run_edit`` writes as ``results.json``."""
from __future__ import annotations

METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


def results_markdown(results: dict) -> str:
    """A table of the five metrics and the splits, then exact match, placement, timing and the gates."""
    m = results["methods"]["visedit"]
    cell = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"# VisEdit on {results['backbone']} — {results['dataset']} ({results['n_eval']} edits)", "",
             "| method | Rel | T-Gen | M-Gen | T-Loc | M-Loc | M-Loc same object | M-Loc other | IM pointing game |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             "| VisEdit | " + " | ".join(cell(m[k]) for k in METRICS) + f" | {cell(m['m_loc_same_object'])} | "
             f"{cell(m['m_loc_other'])} | {cell(m['im_pointing_game'])} |", "",
             "Exact match: " + ", ".join(f"{k} {cell(v)}" for k, v in m["exact_match"].items()) + ".",
             f"Same-image locality (other questions about the edit image): {cell(m.get('loc_same_image'))}."
             + ("" if not m.get("targets") else f" Rel on novel targets {cell(m['targets']['novel']['rel'])}, "
                f"on known targets {cell(m['targets']['known']['rel'])}."),
             f"Secondary ({m['secondary']['protocol']}): T-Loc top-1 {cell(m['secondary']['t_loc_top1'])}, "
             f"M-Loc top-10 {cell(m['secondary']['m_loc_top10'])}.", ""]
    p, t = results["placement"], results["timing"]
    products = f" (per-record products {results['train']['products_s']} s)" if results.get("train") else ""
    lines += [f"Placement: edit layer {p['edit_layer']}, IM read layer {p['im_read_layer']}, IT layers "
              f"{p['it_layers']} (from {p['source']}).",
              f"Timing: train {t['train_s']} s{products}, edit {t['edit_ms']} ms, "
              f"inference overhead {t['inference_overhead']}."]
    gate = m.get("im_gate_mean") or {}
    if gate.get("edit_image") is not None:  # both means exist together: im_maps reads them in pairs
        lines.append(f"IM gate σ(IM), mean over visual tokens: {gate['edit_image']:.3f} on the edits' own inputs, "
                     f"{gate['unrelated_image']:.3f} on their unrelated M-Loc inputs.")
    scene = m.get("scene_gate_mean")
    if scene:
        similarity = m.get("scene_similarity") or "chamfer"
        lines.append(f"Scene gate ({similarity}), mean: {scene['image_rephrase']:.3f} on the edits' re-rendered "
                     f"images, {scene['m_loc']:.3f} on their unrelated M-Loc images.")
    if m.get("target_role"):
        lines.append("VEAD marks the edit sample's target tokens (target role).")
    if m.get("im_pointing_note"):
        lines.append(f"IM pointing game: {m['im_pointing_note']}.")
    return "\n".join(lines) + "\n"
