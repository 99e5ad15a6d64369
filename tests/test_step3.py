"""Step 3 end to end on a tiny model with local prompts: every mode's JSON, responses files, the
sets, the factor lookup, --score_responses, and bad inputs exiting 2 with one line."""

import json

import pytest

from delta_steering.data.ifeval import METRICS
from delta_steering.analysis.verification import factor_standing, neuron_sets
from scripts import interrupting, run_main, step1_file, step2_file

pytestmark = pytest.mark.usefixtures("punkt")

PROMPTS = [
    (1, "Write a short note about the sea. Do not use any commas.", ["punctuation:no_comma"], [{}]),
    (2, "Describe a fox in all capital letters.", ["change_case:english_capital"], [{}]),
    (3, "Tell me about Paris. Include the keyword roof.", ["keywords:existence"], [{"keywords": ["roof"]}]),
    (4, "Write a poem. End it with the phrase 'Is there anything else?'", ["startend:end_checker"],
     [{"end_phrase": "Is there anything else?"}]),
    (5, "Wrap your answer about apples in double quotes.", ["startend:quotation"], [{}]),
]
HIGH = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("step3")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"key": k, "prompt": p, "instruction_id_list": i,
                                                            "kwargs": kw}) + "\n" for k, p, i, kw in PROMPTS))
    impacts = {**{n: 3.0 + n for n in HIGH}, **{n: 0.1 for n in range(4, 32)}}
    variance = [float((7 * n) % 32) for n in range(32)]
    step1_file(root / "step1.json", impacts, 20, tiny_model_dir, 32, variance=variance)
    step2_file(root / "step2.json", root / "step1.json", HIGH, {
        "high_impact": {"factor": 5.0, "beats_baseline": True, "selection_best_factor": 5.0, "confirmed": True},
        "neutral": {"factor": 1.0, "beats_baseline": False, "selection_best_factor": 0.5, "confirmed": False}})
    (root / "pile.txt").write_text("The quick brown fox jumps over the lazy dog.\n\nParis is the capital of France.\n")
    return root


def step3(tiny_model_dir, files, out, *extra, **replace):
    argv = {"--model": tiny_model_dir, "--device": "cpu", "--output_dir": out, "--neurons_file": files / "step1.json",
            "--factors_file": files / "step2.json", "--ifeval_path": files / "prompts.jsonl", "--num_samples": 5,
            "--max_new_tokens": 16, "--pile_path": files / "pile.txt", **replace}
    flat = [str(x) for k, v in argv.items() if v is not None for x in (k, v)]
    return run_main("step3_steer_performance_verification", [*flat, "--no_plots", *extra])


@pytest.fixture(scope="module")
def both(tiny_model_dir, files):
    out = files / "both"
    assert step3(tiny_model_dir, files, out, "--both", "--layers", "19,21") == 0
    return out


def test_both_writes_cluster_and_layer_results_with_every_field(both):
    assert not (both / "combined_steering_ifeval_results.json").exists()
    cluster = json.loads((both / "cluster_ablation_ifeval_results.json").read_text())
    layer = json.loads((both / "layer_ablation_ifeval_results.json").read_text())
    assert [c["name"] for c in cluster["configurations"]] == [
        "baseline", "ablate_delta_sensitive_L20", "ablate_random_L20", "ablate_high_variance_L20"]
    assert [c["name"] for c in layer["configurations"]] == ["baseline", "delta_sensitive_L19", "delta_sensitive_L21"]
    for result in (cluster, layer):
        assert result["run"]["versions"]["transformers"] and result["factor"] == 5.0
        assert result["factor_source"] == "step2-confirmed" and result["pile_documents"]["role"] == "evaluation"
        for c in result["configurations"]:
            assert set(c) >= {*METRICS, "accuracy", "delta", "ci95", "perplexity", "perplexity_delta"}
            assert c["accuracy"] == c["prompt_level_strict_acc"]
            assert c["ci95"][0] <= c["delta"] <= c["ci95"][1] or c["ci95"][0] == c["ci95"][1] == c["delta"]
            rows = [json.loads(line) for line in (both / f"responses_{c['name']}.jsonl").read_text().splitlines()]
            assert len(rows) == 5 and set(rows[0]) >= {"prompt", "response", "strict", "loose"}
    assert cluster["sets"]["delta_sensitive"] == HIGH
    ablated = [c for c in cluster["configurations"] if c["name"] == "ablate_delta_sensitive_L20"][0]
    assert ablated["factor"] == 0.0 and ablated["neurons"] == HIGH
    baseline_rows = (both / "responses_baseline.jsonl").read_text()
    steered = [(both / f"responses_{c['name']}.jsonl").read_text()
               for c in cluster["configurations"][1:] + layer["configurations"][1:]]
    assert any(text != baseline_rows for text in steered)  # steering changes what the model writes


def test_titles_and_descriptions_say_what_ran(both):
    cluster = json.loads((both / "cluster_ablation_ifeval_results.json").read_text())
    layer = json.loads((both / "layer_ablation_ifeval_results.json").read_text())
    assert layer["mode_title"] == "Layer ablation: delta-sensitive set, ×5 amplification at layers 19, 21"
    assert layer["description"].startswith(layer["mode_title"] + ". Step 3, verification")
    assert [c["description"] for c in layer["configurations"][1:]] == [
        "delta_sensitive set, ×5 amplification at layer 19", "delta_sensitive set, ×5 amplification at layer 21"]
    assert cluster["mode_title"] == "Cluster ablation: each set zero-ablated at layer 20"
    assert cluster["configurations"][1]["description"] == "delta_sensitive set, zero ablation at layer 20"
    assert layer["factor_standing"].startswith("steering factor ×5: step 2 confirmed it")


def test_perplexity_changes_carry_a_ci_and_the_run_its_minimum_detectable_effect(both):
    layer = json.loads((both / "layer_ablation_ifeval_results.json").read_text())
    for c in layer["configurations"][1:]:
        lo, hi = c["perplexity_ci95"]
        assert lo <= c["perplexity_delta"] + 1e-6 and c["perplexity_delta"] - 1e-6 <= hi
        assert c["perplexity_relative"] == pytest.approx(100 * c["perplexity_delta"] / layer["configurations"][0][
            "perplexity"], abs=1e-4)
    limit = layer["minimum_detectable_effect"]
    assert limit["examples"] == 5 and limit["alpha"] == 0.05 and limit["power"] == 0.8
    assert limit["discordance"] is not None  # measured on this run's responses
    # Connor's approximation to McNemar's test, written out: 5 equally weighted prompts (S = 1/5) detect
    # a change on every prompt, so the limit exists and solves the power equation
    d, s = limit["points"] / 100, 1 / 5
    p = max(limit["discordance"], d)
    assert d == pytest.approx(1.959964 * (s * p) ** 0.5 + 0.841621 * (s * (p - d * d)) ** 0.5, abs=1e-4)


def test_factor_standing_says_which_factor_and_why():
    lost = {"factor": 1.0, "beats_baseline": False, "selection_best_factor": 2.0, "confirmed": False,
            "selection": {"accuracy": 40.0, "delta": -4.5, "q_value": 0.3}, "confirmation": None}
    assert factor_standing(2.0, "step2-unconfirmed", lost) == (
        "step 2 confirmed no factor; verifying the selection-best ×2, which lost 4.5 points on selection — pass "
        "--factor to choose")
    won = {**lost, "factor": 3.0, "beats_baseline": True, "selection_best_factor": 3.0,
           "selection": {"delta": 2.0}, "confirmation": {"delta": 0.5, "p_value": 0.6}}
    assert factor_standing(3.0, "step2-unconfirmed", won) == (
        "step 2 did not confirm its High Impact factor: verifying the selection-best ×3 (Δ +2.00 points on "
        "selection, then Δ +0.50 on confirmation, not significant) — pass --factor to choose")
    confirmed = {**won, "confirmed": True, "confirmation": {"delta": 3.0, "p_value": 0.01}}
    assert factor_standing(3.0, "step2-confirmed", confirmed) == (
        "steering factor ×3: step 2 confirmed it on its confirmation half (Δ +3.00 points, sign-test p 0.01)")
    assert factor_standing(7.0, "command-line", None) == "steering factor ×7: given on the command line (--factor)"


def test_interrupted_run_resumes_to_the_same_result(tiny_model_dir, files, both, tmp_path, monkeypatch):
    from delta_steering.steps import verify

    real = verify.run_configuration
    monkeypatch.setattr(verify, "run_configuration", interrupting(real, on_call=2))
    assert step3(tiny_model_dir, files, tmp_path, "--both", "--layers", "19,21") == 130
    saved = json.loads((tmp_path / "step3_checkpoint.json").read_text())
    assert list(saved["done"]) == ["baseline"] and len(saved["done"]["baseline"]["responses"]) == 5
    monkeypatch.setattr(verify, "run_configuration", real)
    assert step3(tiny_model_dir, files, tmp_path, "--both", "--layers", "19,21") == 0
    for name in ("cluster_ablation_ifeval_results.json", "layer_ablation_ifeval_results.json"):
        resumed, whole = (json.loads((d / name).read_text()) for d in (tmp_path, both))
        for result in (resumed, whole):
            del result["run"], result["content_sha256"]
            for c in result["configurations"]:
                del c["seconds"]
        assert resumed == whole
    assert not (tmp_path / "step3_checkpoint.json").exists()


def approx_perplexities(result: dict) -> dict:
    """The result with every perplexity figure wrapped in pytest.approx (1e-5 relative, 1e-3 absolute:
    a change is the difference of two perplexities of about 570 here)."""
    def near(value):
        return pytest.approx(value, rel=1e-5, abs=1e-3) if value is not None else None
    for c in result["configurations"]:
        for key in [k for k in c if k.startswith("perplexity")]:
            c[key] = [near(v) for v in c[key]] if isinstance(c[key], list) else near(c[key])
    return result


def test_a_model_split_between_cpu_and_disk_gives_the_responses_of_the_model_in_memory(tiny_model_dir, files, both,
                                                                                       tmp_path):
    """220 KB of CPU memory holds all but blocks 19-23 (the steered layers), read from disk at each forward."""
    assert step3(tiny_model_dir, files, tmp_path, "--both", "--layers", "19,21", "--max_memory", "cpu=220KB",
                 "--offload_folder", tmp_path / "offload", **{"--device": "auto"}) == 0
    for name in ("cluster_ablation_ifeval_results.json", "layer_ablation_ifeval_results.json"):
        offloaded, in_memory = (json.loads((d / name).read_text()) for d in (tmp_path, both))
        for result in (offloaded, in_memory):
            del result["run"], result["content_sha256"]
            for c in result["configurations"]:
                del c["seconds"]
        # perplexity is a float sum over the document: runs of this test measured values up to 4e-7 apart
        # (relative; the same model in memory moves too), so it is compared within that; the rest exactly
        assert approx_perplexities(offloaded) == in_memory
    responses = sorted(p.name for p in both.glob("responses_*.jsonl"))
    assert responses and responses == sorted(p.name for p in tmp_path.glob("responses_*.jsonl"))
    for name in responses:
        assert (tmp_path / name).read_text() == (both / name).read_text()


def test_combined_is_the_default_mode(tiny_model_dir, files, tmp_path):
    assert step3(tiny_model_dir, files, tmp_path, "--factor", "2", **{"--num_samples": 2, "--max_new_tokens": 4}) == 0
    result = json.loads((tmp_path / "combined_steering_ifeval_results.json").read_text())
    assert [c["name"] for c in result["configurations"]] == ["baseline", "delta_sensitive_L20", "random_L20",
                                                              "high_variance_L20"]
    assert result["factor"] == 2.0 and result["factor_source"] == "command-line"


def test_neuron_sets(tmp_path):
    from delta_steering.artifacts import read_discovery

    impacts = {n: 5.0 - n for n in range(10)}
    step1 = read_discovery(step1_file(tmp_path / "a.json", impacts, 0, "m", 10, variance=[float(n) for n in range(10)]))
    sets, warnings = neuron_sets(step1, 10, seed=0)
    assert sets["delta_sensitive"] == [0, 1, 2] and not warnings
    assert len(sets["random"]) == 3 and not set(sets["random"]) & {0, 1, 2}
    assert sets["random"] == neuron_sets(step1, 10, seed=0)[0]["random"]
    assert sets["high_variance"] == [7, 8, 9]
    step1 = read_discovery(step1_file(tmp_path / "b.json", {n: 1.0 - n for n in range(30)}, 0, "m", 40))
    sets, warnings = neuron_sets(step1, 40, seed=0)
    assert sets["delta_sensitive"] == list(range(20)) and "top 20" in warnings[0]


def test_score_responses_needs_no_model(files, tmp_path, capsys):
    responses = files / "responses.jsonl"
    texts = ["The sea is calm and blue", "THE RED FOX RUNS QUICKLY THROUGH THE GREEN FOREST AND JUMPS OVER THE LAZY DOG", "Paris has a roof", "Nice poem. Is there anything else?",
             '"Apples are sweet"']
    responses.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for (_, p, *_), r in zip(PROMPTS, texts)))
    argv = ["--score_responses", responses, "--ifeval_path", files / "prompts.jsonl", "--output_dir", tmp_path,
            "--model", "./does/not/exist"]
    assert run_main("step3_steer_performance_verification", argv) == 0
    assert "prompt_level_strict_acc: 100.00" in capsys.readouterr().out
    assert json.loads((tmp_path / "responses_scores.json").read_text())["metrics"]["inst_level_strict_acc"] == 100.0


def test_score_responses_reproduces_gpt4_file(shared_data, tmp_path, capsys):
    argv = ["--score_responses", shared_data / "ifeval" / "input_response_data_gpt4_20231107_145030.jsonl",
            "--ifeval_path", shared_data / "ifeval" / "input_data.jsonl", "--output_dir", tmp_path]
    assert run_main("step3_steer_performance_verification", argv) == 0
    out = capsys.readouterr().out
    assert "prompt_level_strict_acc: 77.08" in out and "inst_level_strict_acc: 83.69" in out


def test_bad_inputs_exit_2_with_one_line(tiny_model_dir, files, tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad_prompts.jsonl").write_text('{"key": 1, "prompt": "x"}\n')
    step2_file(tmp_path / "no_factor.json", files / "step1.json", HIGH, {"high_impact": None})
    (tmp_path / "old_format.json").write_text(json.dumps({"format_version": 1, "optimal_factors": {"high_impact": 5.0}}))
    cases = [
        ({"--neurons_file": tmp_path / "missing.json"}, "missing.json"),
        ({"--factors_file": tmp_path / "missing2.json"}, "missing2.json"),
        ({"--neurons_file": tmp_path / "bad.json"}, "not valid JSON"),
        ({"--factors_file": tmp_path / "no_factor.json"}, "pass --factor"),
        ({"--factors_file": tmp_path / "old_format.json"}, "format_version"),
        ({"--ifeval_path": tmp_path / "bad_prompts.jsonl"}, "line 1"),
        ({"--layer": 24}, "--layer 24 out of range"),
        ({"--num_samples": 0}, "--num_samples must be at least 1"),
    ]
    for replace, message in cases:
        assert step3(tiny_model_dir, files, tmp_path, **replace) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (message, err)
    monkeypatch.chdir(tmp_path)
    assert step3(tiny_model_dir, files, tmp_path, **{"--neurons_file": None}) == 2
    assert "tried discovered_neurons.json, ablation_3_results/discovered_neurons.json" in capsys.readouterr().err


def test_an_unconfirmed_step2_factor_is_used_and_said_so(tiny_model_dir, files, tmp_path, capsys):
    step2 = tmp_path / "unconfirmed.json"
    step2_file(step2, files / "step1.json", HIGH, {"high_impact": {
        "factor": 1.0, "beats_baseline": False, "selection_best_factor": 3.0, "confirmed": False}})
    assert step3(tiny_model_dir, files, tmp_path, **{"--factors_file": step2, "--num_samples": 2,
                                                     "--max_new_tokens": 4}) == 0
    result = json.loads((tmp_path / "combined_steering_ifeval_results.json").read_text())
    assert result["factor"] == 3.0 and result["factor_source"] == "step2-unconfirmed"
    out = capsys.readouterr().out
    assert "NOT confirmed" in out and "unconfirmed" in out
    standing = "step 2 confirmed no factor; verifying the selection-best ×3 — pass --factor to choose"
    summary = out[out.index("\nCombined steering: ") - len(standing) - 1:]
    assert summary.startswith(standing)  # the summary leads with the factor's standing


def test_best_mark_only_on_a_gain_whose_ci_lies_above_zero(capsys):
    from delta_steering.analysis.verification import best_configuration, print_summary

    def entry(name, accuracy, ci):
        return {"name": name, "accuracy": accuracy, "delta": accuracy - 50.0, "ci95": ci, "perplexity": None,
                "neurons": [] if name == "baseline" else [1], "factor": 2.0}

    tie = [entry("baseline", 50.0, [0.0, 0.0]), entry("a", 50.0, [0.0, 0.0]), entry("b", 55.0, [-1.0, 9.0])]
    assert best_configuration(tie) is None
    print_summary("Combined steering", tie, "prompt_level_strict_acc", 2.0, "command-line")
    out = capsys.readouterr().out
    assert "✓" not in out and "no configuration beats the baseline" in out
    wins = tie + [entry("c", 54.0, [0.5, 8.0])]
    assert best_configuration(wins)["name"] == "c"
    print_summary("Combined steering", wins, "prompt_level_strict_acc", 2.0, "command-line")
    assert [line for line in capsys.readouterr().out.splitlines() if "✓ (best)" in line][0].split()[2] == "c"


def test_perplexity_documents_are_disjoint_from_step1_statistics_documents(tiny_model_dir, files, tmp_path):
    pile = tmp_path / "pile.txt"
    pile.write_text("\n\n".join(f"Document {i} about the sea and the fox." for i in range(8)) + "\n")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": f"Key {i} is", "choices": [" red", " blue"], "label": i % 2}) + "\n"
                            for i in range(6)))
    assert run_main("step1_neuron_discovery", ["--model", tiny_model_dir, "--device", "cpu", "--tasks", task,
                                               "--neurons", "0-1", "--save_path", tmp_path / "d.json", "--no_plots",
                                               "--pile_path", pile, "--output_dir", tmp_path]) == 0
    assert step3(tiny_model_dir, files, tmp_path, "--factor", "2", **{"--num_samples": 1, "--max_new_tokens": 2,
                                                                      "--pile_path": pile}) == 0
    step1 = json.loads((tmp_path / "d.json").read_text())["delta_statistics_documents"]
    step3_docs = json.loads((tmp_path / "combined_steering_ifeval_results.json").read_text())["pile_documents"]
    assert step1["count"] == step3_docs["count"] == 4
    assert not set(step1["digests"]) & set(step3_docs["digests"])
