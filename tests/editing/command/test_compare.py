"""The comparison harness: data roles, one process per method, results files, resuming after a cut, and
its results read back checked (fuzzed)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attrib.errors import ArtifactError
from attrib.io import REPOSITORY
from attrib.world import write_world
from editing.command.compare import CompareOptions, data_roles, prepared_method, read_method, run_compare
from editing.command.compare_report import compare_markdown, lifelong_markdown, read_results
from tests.mutations import json_mutations, valid_or_clean_error


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("cmp") / "w", seed=0, n_train=8, n_eval=3, n_caption_train=1,
                       n_caption_eval=1)


def _options(world, tiny_dirs, out, **kwargs) -> CompareOptions:
    return CompareOptions(backbone="blip2", model=tiny_dirs["blip2"], train=world / "vqa_train.json",
                          eval=world / "vqa_eval.json", dev_n=3, n_dev=3, out=out, progress=False, **kwargs)


def test_roles_carve_dev_from_train_by_seed_and_test_is_eval(world, tiny_dirs, tmp_path):
    roles = data_roles(_options(world, tiny_dirs, tmp_path))
    assert len(roles.train) == 5 and len(roles.dev) == 3 and len(roles.test) == 3
    assert not {r.index for r in roles.train} & {r.index for r in roles.dev}
    again = data_roles(_options(world, tiny_dirs, tmp_path))
    assert [r.index for r in again.dev] == [r.index for r in roles.dev]
    assert roles.described["dev"]["drawn_with_seed"] == 0
    with pytest.raises(ValueError, match="test seed 1"):
        data_roles(CompareOptions(test_seed=1))


def test_methods_run_apart_and_a_second_run_resumes(world, tiny_dirs, tmp_path):
    options = _options(world, tiny_dirs, tmp_path, methods=("none", "lookup"))
    results = run_compare(options)
    none, lookup = results["methods"]["none"], results["methods"]["lookup"]
    assert lookup["rel"] == 100.0 and lookup["t_loc"] == 100.0 and lookup["t_loc_by_construction"]
    assert none["m_loc"] == 100.0 and none["loc_same_image"] == 100.0
    for method in (none, lookup):
        assert method["mean"] == pytest.approx(sum(method[k] for k in ("rel", "t_gen", "m_gen", "t_loc", "m_loc")) / 5,
                                               abs=0.01)
        assert method["peak_mem_mb"] > 0 and method["prepare_s"] >= 0 and method["inference_overhead"] > 0
        assert method["latency_protocol"].startswith("forward only")
        assert method["wall_s"] > 0 and method["wall_s"] >= method["prepare_s"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["roles"]["test"]["file"].endswith("vqa_eval.json") and set(saved["methods"]) == {"none", "lookup"}
    report = (tmp_path / "results.md").read_text()
    assert "**100.0**" in report and "†" not in report and (tmp_path / "metrics.png").is_file()
    wall = (none["wall_s"] + lookup["wall_s"]) / 60
    assert f"Wall time: {wall:.1f} min for 2 methods" in report and "not recorded" not in report
    del saved["methods"]["none"]["latency_protocol"]  # as written by the first, median-of-5 protocol
    assert f"{none['inference_overhead']}† |" in compare_markdown(saved)
    del saved["methods"]["lookup"]["latency_protocol"]
    assert "over unedited." in compare_markdown(saved)  # no protocol recorded: no empty parentheses
    stamp = (tmp_path / "methods" / "lookup.json").stat().st_mtime_ns
    (tmp_path / "methods" / "none.json").unlink()  # as if the run had been killed during "none"
    run_compare(options)
    assert (tmp_path / "methods" / "lookup.json").stat().st_mtime_ns == stamp  # kept, not run again
    assert (tmp_path / "methods" / "none.json").is_file()


def test_set_replaces_config_values_is_recorded_and_a_resumed_run_must_ask_for_the_same(world, tiny_dirs, tmp_path):
    options = _options(world, tiny_dirs, tmp_path, methods=("ft_l",), overrides={"ft_l": {"steps": 2, "lr": 1}})
    results = run_compare(options)
    ft_l = json.loads((tmp_path / "methods" / "ft_l.json").read_text())
    assert ft_l["hyper"]["steps"] == 2 and ft_l["hyper"]["lr"] == 1.0 and isinstance(ft_l["hyper"]["lr"], float)
    assert ft_l["hyper"]["weight_decay"] == 0.01  # the config file's value where --set says nothing
    assert ft_l["overrides"] == results["overrides"]["ft_l"] == {"steps": 2, "lr": 1.0}
    report = (tmp_path / "results.md").read_text()
    assert "Changed from the config files (`--set`): ft_l.steps=2, ft_l.lr=1.0." in report
    stamp = (tmp_path / "methods" / "ft_l.json").stat().st_mtime_ns
    run_compare(options)  # the same --set: resumed, not run again
    assert (tmp_path / "methods" / "ft_l.json").stat().st_mtime_ns == stamp
    for other, said in (({}, "not nothing"), ({"ft_l": {"steps": 3, "lr": 1.0}}, "not ft_l.steps=3 ft_l.lr=1.0")):
        with pytest.raises(ValueError, match=rf"ft_l.json: ran with --set ft_l.steps=2 ft_l.lr=1.0, {said}; delete"):
            run_compare(replace(options, overrides=other))
    assert (tmp_path / "methods" / "ft_l.json").stat().st_mtime_ns == stamp


def test_set_refuses_an_unknown_key_a_wrong_type_or_a_method_not_run(world, tiny_dirs, tmp_path):
    options = _options(world, tiny_dirs, tmp_path, methods=("none", "ft_l"))
    cases = [({"ft_l": {"stepz": 2}}, r"--set ft_l.stepz: .*ft_l.yaml has no 'stepz'; its keys: steps, lr"),
             ({"ft_l": {"steps": "many"}}, r"--set ft_l.steps='many': the config's value is 15 \(int\); give one"),
             ({"tp": {"steps": 2}}, r"--set tp.\*: tp is not among the methods run \(none, ft_l\)")]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            run_compare(replace(options, overrides=overrides))
        assert not (tmp_path / "methods").exists()  # refused before anything ran


# -- reading results back -------------------------------------------------------------------------------------

SHIPPED = REPOSITORY / "figures" / "blip2" / "compare" / "results.json"  # a real comparison's results


def test_a_malformed_method_result_stops_a_resumed_run_before_any_method_runs(world, tiny_dirs, tmp_path):
    options = _options(world, tiny_dirs, tmp_path, methods=("none", "lookup"))
    (tmp_path / "methods").mkdir()
    result = json.loads(SHIPPED.read_text())["methods"]["lookup"]
    cases = [("{", r"lookup.json: not valid JSON"),
             (json.dumps({**result, "rel": "high"}), r"lookup.json, field 'rel': expected a number or null"),
             (json.dumps({**result, "mean": float("nan")}), r"lookup.json, field 'mean': nan; expected a finite"),
             (json.dumps({k: v for k, v in result.items() if k != "protocol"}), r"lookup.json: missing field 'protoc")]
    for text, message in cases:
        (tmp_path / "methods" / "lookup.json").write_text(text)
        with pytest.raises(ArtifactError, match=message + r".*; delete the file to run the method again"):
            run_compare(options)
        assert not (tmp_path / "methods" / "none.json").exists()  # refused before "none" ran


def test_results_json_is_read_back_checked(tmp_path):
    results = read_results(SHIPPED)
    assert "| visedit |" in compare_markdown(results)
    bad = tmp_path / "results.json"
    for data, message in [({**results, "methods": {"x": {**results["methods"]["none"], "targets": []}}},
                           r"in 'methods.x', field 'targets': expected an object or null, found a list"),
                          ({**results, "roles": {"train": {}, "dev": {}}}, r"in 'roles': missing field 'test'"),
                          ({**results, "n_test": "300"}, r"field 'n_test': expected a whole number, found a string")]:
        bad.write_text(json.dumps(data))
        with pytest.raises(ArtifactError, match=message):
            read_results(bad)


@given(data=st.data())
def test_fuzz_results_json(tmp_path, data):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data.draw(json_mutations(json.loads(SHIPPED.read_text())))))
    results, _ = valid_or_clean_error(lambda: read_results(path), path)
    if results is not None:
        compare_markdown(results)  # what the reader let through, the report can render


@given(data=st.data())
def test_fuzz_method_results(tmp_path, data):
    shipped = json.loads(SHIPPED.read_text())
    name = data.draw(st.sampled_from(sorted(shipped["methods"])))
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data.draw(json_mutations(shipped["methods"][name]))))
    method, _ = valid_or_clean_error(lambda: read_method(path), path)
    if method is not None:
        compare_markdown({**shipped, "methods": {**shipped["methods"], name: method}})


def test_prepare_only_trains_the_learned_methods_as_two_processes_and_compare_reuses_them(world, tiny_dirs,
                                                                                         tmp_path, monkeypatch):
    """`compare --prepare-only` under ``accelerate launch`` (two CPU processes) fits MEND and SERAC into
    OUT/work, written once; a plain `compare` afterwards loads them instead of training again. A plain
    `compare` under the launcher is refused in one line."""
    from pathlib import Path

    import editing.methods as methods
    from tests.editing.command.prepare_run import shrunk_config
    from tests.launch import launch

    out = tmp_path / "cmp"
    shared = launch(str(Path(__file__).with_name("prepare_run.py")), str(tiny_dirs["blip2"]), str(world), str(out))
    assert shared.stdout.count("prepared mend, serac") == 1
    assert (out / "work" / "mend" / "mend.safetensors").is_file()
    assert (out / "work" / "serac" / "serac_counterfactual.json").is_file()
    monkeypatch.setattr(methods, "method_config", shrunk_config)
    options = _options(world, tiny_dirs, out, methods=("mend", "serac"))
    for name in ("mend", "serac"):  # what a method's process in `compare` does first, here in this one
        editor, _, _, prepared, _ = prepared_method(options, name)
        editor.close()
        assert "loaded" in prepared if name == "mend" else prepared["counterfactual"]["resumed"] is True
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="only --prepare-only runs"):
        run_compare(_options(world, tiny_dirs, out, methods=("mend",)))


def test_lifelong_compare_scores_every_n_and_reports_them(world, tiny_dirs, tmp_path):
    options = _options(world, tiny_dirs, tmp_path, methods=("none", "ft_l"), edits=(1, 3))
    assert options.fitted() == options.output() == tmp_path  # OUT given: the fits live beside the results
    results = run_compare(options)
    assert results["edits"] == [1, 3] and results["n_test"] == 3 and results["skipped"] == []
    assert results["images"]["edits"] == 3 and results["images"]["distinct_images"] >= 1
    for name in ("none", "ft_l"):
        per_n = results["sequential"][name]
        assert set(per_n) == {"1", "3"}
        assert (per_n["1"]["n_chunks"], per_n["3"]["n_chunks"]) == (3, 1)
        assert all(s["n_eval"] == 3 and s["latency_ratio"] > 0 for s in per_n.values())
    assert results["sequential"]["none"]["3"]["m_loc"] == 100.0
    # the first method computed the pre-edit rows of each N; the second read them (`pre_edit_cache`)
    assert {s["pre_edit"] for s in results["sequential"]["none"].values()} == {"computed"}
    assert {s["pre_edit"] for s in results["sequential"]["ft_l"].values()} == {"shared"}
    assert sorted(p.name for p in (tmp_path / "pre-edit").iterdir()) == ["1.safetensors", "3.safetensors"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["sequential"]) == {"none", "ft_l"} and "sequential" not in saved["methods"]["ft_l"]
    assert "| N=1 | N=3 |" in (tmp_path / "results.md").read_text() and (tmp_path / "lifelong.png").is_file()
    read_method(tmp_path / "methods" / "ft_l.json", lifelong=True)
    path = tmp_path / "methods" / "ft_l.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "sequential": {"3": {**data["sequential"]["3"], "rel": "high"}}}))
    with pytest.raises(ArtifactError, match=r"ft_l.json, in 'sequential.3', field 'rel'"):
        read_method(path, lifelong=True)



def test_latency_only_measures_the_latency_again_and_keeps_the_scores(world, tiny_dirs, tmp_path):
    options = _options(world, tiny_dirs, tmp_path, methods=("none",), edits=(1, 3))
    run_compare(options)
    path = tmp_path / "methods" / "none.json"
    first = json.loads(path.read_text())
    assert first["latency_protocol"].startswith("forward only")
    del first["latency_protocol"]  # as a file written by the first, median-of-11 protocol
    for scores in first["sequential"].values():
        scores["latency_ratio"], scores["latency_s"] = 9.0, {}
    path.write_text(json.dumps(first))
    assert "9.0† |" in lifelong_markdown(run_compare(options))  # read back, nothing run
    scored = json.loads((tmp_path / "results.json").read_text())["run"]
    again = run_compare(replace(options, latency_only=True))
    assert again["run"] == scored and again["latency_run"]["methods"] == ["none"]
    assert "Latency measured again alone for none (`--latency-only`" in (tmp_path / "results.md").read_text()
    measured = json.loads(path.read_text())
    assert measured["wall_s"] == first["wall_s"] > 0  # the scoring run's, not the re-measurement's
    assert measured["latency_protocol"].startswith("forward only") and "†" not in (tmp_path / "results.md").read_text()
    for n, scores in measured["sequential"].items():
        assert scores["latency_ratio"] != 9.0 and set(scores["latency_s"]) == {"unedited_before_s", "edited_s",
                                                                               "unedited_after_s"}
        assert {k: v for k, v in scores.items() if not k.startswith("latency")} == \
            {k: v for k, v in first["sequential"][n].items() if not k.startswith("latency")}
        assert again["sequential"]["none"][n]["latency_ratio"] == scores["latency_ratio"]
    with pytest.raises(ValueError, match="hold N = 1, 3, not --edits 1,2"):
        run_compare(replace(options, latency_only=True, edits=(1, 2)))
    with pytest.raises(ValueError, match="no lifelong results of ft_l"):
        run_compare(replace(options, latency_only=True, methods=("none", "ft_l")))
    with pytest.raises(ValueError, match="needs --edits"):
        run_compare(replace(options, latency_only=True, edits=()))
    with pytest.raises(ValueError, match="alone: run it with --jobs 1"):
        run_compare(replace(options, latency_only=True, jobs=2))


def test_default_lifelong_folder_shares_the_single_edit_fits():
    options = CompareOptions(backbone="llava", edits=(1, 10))
    assert str(options.output()) == "runs/compare/llava-vqa-lifelong"
    assert str(options.fitted()) == "runs/compare/llava-vqa" == str(CompareOptions(backbone="llava").output())


def _timed_child(options, name, path, parent, threads):
    """A stand-in method: records when it ran and with how many threads; "bad" fails."""
    import os
    import time
    from pathlib import Path

    start = time.monotonic()
    time.sleep(0.3)
    if name == "bad":
        os._exit(3)
    Path(path).write_text(json.dumps({"start": start, "end": time.monotonic(), "threads": threads}))


def test_jobs_run_side_by_side_and_visedit_methods_apart_until_their_placement_is_written(tmp_path, monkeypatch):
    from editing.command import compare

    monkeypatch.setattr(compare, "METHOD_START", "fork")
    monkeypatch.setattr(compare, "_child", _timed_child)
    names = ["visedit", "visedit_gated", "none", "ft_l", "tp"]
    done = list(compare._run_children(CompareOptions(jobs=2, out=tmp_path), names, tmp_path))
    assert sorted(done) == sorted(names)
    runs = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in names}
    assert all(run["threads"] == compare.child_threads(2) >= 1 for run in runs.values())
    overlaps = [(a, b) for a in names for b in names if a < b
                and runs[a]["start"] < runs[b]["end"] and runs[b]["start"] < runs[a]["end"]]
    assert overlaps and ("visedit", "visedit_gated") not in overlaps  # two at a time, the VisEdit ones apart
    starts = [run["start"] + 0.01 for run in runs.values()]
    assert all(sum(run["start"] < t < run["end"] for run in runs.values()) <= 2 for t in starts)
    (tmp_path / "attribution").mkdir()
    (tmp_path / "attribution" / "attribution.json").write_text("{}")  # once the placement is written
    list(compare._run_children(CompareOptions(jobs=2, out=tmp_path), ["visedit", "visedit_gated"], tmp_path))
    runs = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("visedit", "visedit_gated")}
    assert runs["visedit_gated"]["start"] < runs["visedit"]["end"]  # the two VisEdit methods run side by side
    assert compare.child_threads(1) is None and compare.child_threads(2, threads=2) == 1
    assert compare.child_threads(3, threads=2) == 1 and compare.child_threads(2, threads=8) == 4
    with pytest.raises(ValueError, match="--jobs must be at least 1"):
        compare.child_threads(0)


def test_a_failed_method_stops_the_one_beside_it(tmp_path, monkeypatch):
    from editing.command import compare

    monkeypatch.setattr(compare, "METHOD_START", "fork")
    monkeypatch.setattr(compare, "_child", _timed_child)
    with pytest.raises(RuntimeError, match="method bad failed \\(exit code 3\\)"):
        list(compare._run_children(CompareOptions(jobs=2), ["bad", "slow", "never"], tmp_path))
    assert not (tmp_path / "never.json").exists()


def test_a_comparison_with_two_jobs_scores_as_one_and_reports_its_own_wall_time(world, tiny_dirs, tmp_path):
    one = run_compare(_options(world, tiny_dirs, tmp_path / "one", methods=("none", "lookup")))
    two = run_compare(_options(world, tiny_dirs, tmp_path / "two", methods=("none", "lookup"), jobs=2))
    for name in ("none", "lookup"):
        for key in ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "loc_same_image"):
            assert two["methods"][name][key] == one["methods"][name][key], (name, key)
    assert two["run"]["jobs"] == 2 and two["run"]["methods"] == ["none", "lookup"] and two["run"]["wall_s"] > 0
    report = (tmp_path / "two" / "results.md").read_text()
    assert f"Wall time: {two['run']['wall_s'] / 60:.1f} min for 2 methods run 2 side by side" in report
    assert "side by side" not in (tmp_path / "one" / "results.md").read_text()
    assert two["methods"]["none"]["latency_jobs"] == 2 and one["methods"]["none"]["latency_jobs"] == 1
    assert "‡ timed while up to 2 methods ran side by side" in report and "‡ |" in report
    assert "‡" not in (tmp_path / "one" / "results.md").read_text()
    again = run_compare(_options(world, tiny_dirs, tmp_path / "two", methods=("none", "lookup"), jobs=2))
    assert again["run"] == two["run"]  # nothing scored: the scoring invocation's record is kept
    assert (tmp_path / "two" / "results.md").read_text() == report
    (tmp_path / "two" / "methods" / "lookup.json").unlink()  # one method scored again, alone
    later = run_compare(_options(world, tiny_dirs, tmp_path / "two", methods=("none", "lookup")))
    assert later["run"] == two["run"] and [r["methods"] for r in later["rescored"]] == [["lookup"]]
    assert later["rescored"][0]["jobs"] == 1 and later["methods"]["lookup"]["latency_jobs"] == 1
    rescored = (tmp_path / "two" / "results.md").read_text()
    assert f"Wall time: {two['run']['wall_s'] / 60:.1f} min for 2 methods run 2 side by side" in rescored
    assert "Scored again later by another invocation (1 job, " in rescored and "): lookup; that row is its" in rescored
    assert run_compare(_options(world, tiny_dirs, tmp_path / "two", methods=("none", "lookup")))["rescored"] \
        == later["rescored"]  # read back: kept
