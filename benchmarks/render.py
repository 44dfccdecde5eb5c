"""BENCHMARKS.md from the result files in benchmarks/results/ (formatting only; no timing).

    python benchmarks/render.py > BENCHMARKS.md
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine(r: dict) -> str:
    m = r["machine"]
    return (f"Command: `{r['command']}`  \nMachine: {m['cpu']}, {m['threads']} threads, Python {m['python']}, "
            f"torch {m['torch']}; {r['date']}; fxopt commit `{r['commit']}`.")


def kron_linear(r: dict) -> list[str]:
    names = list(r["settings"])
    lines = [
        "## KronLinear against nn.Linear (CPU)", "", machine(r), "",
        "Each setting's cell gives the speed-up of the Kronecker layer, > 1 meaning faster:",
        "**best against best** (the faster of its eager and compiled forms against the faster of",
        "dense eager and dense under `torch.compile`) · eager against dense eager · eager against",
        "dense compiled · compiled against dense compiled. `rule` is what `rules/kron.yaml` builds",
        "(compression 32 within half the dense FLOPs; its rank in brackets), `r4` and `r1` are ranks",
        "4 and 1. `FLOPs÷` is dense FLOPs over Kronecker FLOPs.", "",
        "| in×out | batch | dense µs | dense+compile µs | " + " | ".join(f"{n} FLOPs÷ | {n}" for n in names) + " |",
        "|---|---|---|---|" + "---|---|" * len(names),
    ]
    for row in r["rows"]:
        cells = []
        for n in names:
            s = row["settings"][n]
            cells += [(f"[{s['rank']}] " if n == "rule" else "") + f"{s['flops_ratio']}",
                      f"**{s['speedup_best_vs_best_dense']}** · {s['speedup_eager_vs_dense']} · "
                      f"{s['speedup_eager_vs_dense_compiled']} · {s['speedup_compiled_vs_dense_compiled']}"]
        lines.append(f"| {row['in']}×{row['out']} | {row['batch']} | {row['us']['dense']} | "
                     f"{row['us']['dense+compile']} | " + " | ".join(cells) + " |")
    return lines + ["", "Raw numbers: `benchmarks/results/kron_linear_cpu.json`.", ""]


def kron_linear_large(r: dict) -> list[str]:
    lines = [f"## `KronLinear` at language-model sizes (CPU: {r['machine']['cpu']})", "", machine(r), ""]
    lines += [r["note"], ""] if "note" in r else []
    lines += ["4096×4096 with 64×64 factors and 4096 → 11008 with automatic factors, built with `max_flops_ratio: null`",
              "at ranks 1 and 4; forward, and a training step (forward + backward into every parameter and the",
              "input). Speed-ups against `nn.Linear`: **best against best** (the faster of eager and compiled on",
              "each side) · eager against eager · compiled against compiled; in brackets the FLOP ratio (at small",
              "batches the dense layer is bound by reading its weights, so the speed-up can exceed it).", "",
              "| in × out | mode | batch | dense µs (eager / compiled) | rank 1: best · eager · compiled (FLOP ratio) "
              "| rank 4: best · eager · compiled (FLOP ratio) |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        cells = []
        for name in ("r1", "r4"):
            st = row["settings"][name]
            cells.append(f"**{st['speedup_best_vs_best_dense']}×** · {st['speedup_eager_vs_dense']}× · "
                         f"{st['speedup_compiled_vs_dense_compiled']}× ({st['flops_ratio']}×)")
        lines.append(f"| {row['in']}×{row['out']} | {row['mode']} | {row['batch']} | {row['us']['dense']:,.0f} / "
                     f"{row['us']['dense+compile']:,.0f} | " + " | ".join(cells) + " |")
    return lines + ["", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


def kron_build(r: dict) -> list[str]:
    alex = r["alexnet"]
    applied = [s for s in alex["sites"] if s["status"] in ("applied", "rolled_back")]
    lines = ["## Build time of the SVD-based substitutes (CPU)", "", machine(r), "",
             f"AlexNet's architecture (random weights) through `fxopt optimize` with `rules/kron.yaml`: the build "
             f"stage took **{alex['stages']['build']:.2f} s** for {len(applied)} layers (the 9216 → 4096 layer "
             f"{max(s['build_seconds'] for s in applied):.2f} s); the whole run's stages: "
             + ", ".join(f"{k} {v:.2f} s" for k, v in alex["stages"].items()) + ".", "",
             "Single layers of a Llama-style MLP at the shipped defaults:", "",
             "| technique | in → out | rank kept | seconds | reconstruction error |", "|---|---|---|---|---|"]
    for row in r["layers"]:
        lines.append(f"| `{row['technique']}` | {row['in']} → {row['out']} | {row['rank']} | {row['seconds']:.2f} "
                     f"| {row['reconstruction_error']:.3f} |")
    return lines + ["", "`kron` keeps far fewer terms than the rearranged matrix's side, so it takes the randomized "
                    "truncated SVD; `lowrank`'s default keeps 36% of the spectrum, which takes the full SVD.",
                    "", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


def kron_trained(r: dict) -> list[str]:
    st = r["settings"]
    digits = all(x["model"].startswith("digits_") for x in r["results"])
    if digits:
        x0 = r["results"][0]
        lines = ["## `kron` on trained digit classifiers (CPU)", "", machine(r["run"]), "",
                 "Models trained here on scikit-learn's handwritten digits (1,347 training images; 450 held out, the "
                 "split of examples/digits.py; the seed varies initialisation and order): `digits_mlp` (64 → 2048 → "
                 "2048 → 2048 → 10, its two 2048 × 2048 layers as 6-term Kronecker sums, `rank: 6`), `digits_cnn` "
                 "(3×3 convolutions 1-32-64-128-128, every one but the stem at `compression: 8`, FLOPs uncapped) and "
                 "`digits_vit` (2×2 patches, two pre-norm encoder layers of width 128, every encoder linear as "
                 "`kron` under the default FLOPs cap). Then "
                 f"{st['layerwise_steps']} layer-wise steps per site and "
                 f"{x0['overrides'].get('distill_steps', st['distill_steps'])} distillation steps (per-layer targets "
                 f"at weight {st['distill_sites']:g}) on the unlabelled training images; each result holds its rule "
                 f"file and training settings. Speed: inference at batch {st['batch']}, best against best · eager · "
                 "compiled."]
    else:
        lines = ["## `kron` on trained models (CPU)", "", machine(r["run"]), "",
                 f"Models trained here on the generated shapes task ({st['train']:,} training images, {st['epochs']} "
                 f"epochs; {st['test']:,} test images from another seed), rewritten with `kron` at compression "
                 f"{st['compression']:g} per layer (convolutions but the stem; linears but the head), then "
                 f"{st['layerwise_steps']} layer-wise steps per site and {st['distill_steps']} distillation steps "
                 f"(per-layer targets at weight {st['distill_sites']:g}) on {st['calib_batches']} unlabelled batches "
                 f"of 64. Speed: inference at batch {st['batch']}, best against best · eager · compiled."]
    lines += ["", "| model | seed | test accuracy | params | FLOPs | speed-up | compression time |",
              "|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(x["model"] for x in r["results"]))
    for x in sorted(r["results"], key=lambda x: (order.index(x["model"]), x["seed"])):
        acc, sp = x["accuracy"], x["speedup"]
        lines.append(f"| {x['model']} | {x['seed']} | {acc['original']:.2f}% → {acc['fxopt']:.2f}% ({acc['change']:+.2f}) "
                     f"| {x['params_ratio']}× fewer | {x['flops_ratio']}× fewer | **{sp['best']:.2f}×** · "
                     f"{sp['eager']:.2f}× · {sp['compiled']:.2f}× | {x['compress_seconds']:.0f} s |")
    means = []
    for model in dict.fromkeys(x["model"] for x in r["results"]):
        res = [x for x in r["results"] if x["model"] == model]
        if len(res) > 1:
            mean = lambda f: sum(f(x) for x in res) / len(res)  # noqa: E731
            means.append(f"{model}: accuracy {mean(lambda x: x['accuracy']['change']):+.2f} points, "
                         f"{mean(lambda x: x['params_ratio']):.1f}× fewer parameters, "
                         f"**{mean(lambda x: x['speedup']['best']):.2f}×** best against best")
    if means:
        lines += ["", f"Means over seeds: {'; '.join(means)}."]
    return lines + ["", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


def examples(r: dict) -> list[str]:
    lines = [
        f"## Whole examples with `rules/kron.yaml` (CPU: {r['machine']['cpu']})", "", machine(r), "",
        *([r["note"], ""] if "note" in r else []),
        "`fxopt bench` on each example: the original model against the rewritten one (the program",
        "`fxopt.load` returns), each eager and under `torch.compile`. Speed-ups: **best against best**",
        "(the faster of eager and compiled on each side) · eager against eager · compiled",
        "against compiled. The error columns say what the speed costs (the examples have random weights,",
        "the worst case for a Kronecker approximation: docs/experiments/kron_examples.md).", "",
    ]
    return lines + _example_rows(r)


def examples_efficient(r: dict) -> list[str]:
    lines = [
        "## Whole examples with `lowrank`, `separable` and `bottleneck` (CPU)", "", machine(r), "",
        f"As above, with the shipped rule sets, after {r['layerwise_steps']} layer-wise training steps per site on",
        "the examples' calibration batches (random weights, so the errors are only indicative).",
        "The rules are gated (`require_speedup`): `applied` lists the sites whose substitute was",
        "measured fast enough during `optimize`; the others kept their original layer.", "",
    ]
    return lines + _example_rows(r, rules_column=True)


def _example_rows(r: dict, rules_column: bool = False) -> list[str]:
    extra = ("| rules | applied " if rules_column else "")
    lines = [
        f"| example {extra}| input | original µs | original+compile µs | fxopt µs | fxopt+compile µs | speed-up | params÷ | FLOPs÷ | cosine | top-1 agreement |",
        "|---|" + ("---|---|" if rules_column else "") + "---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        us, sp, acc, size = row["end_to_end"]["us"], row["end_to_end"]["speedup"], row["accuracy"], row["size"]
        top1 = "—" if acc["top1_agreement"] is None else f"{acc['top1_agreement']:.2f}"
        cells = f"| {row['rules']} | {len(row['applied'])} of {row['sites_claimed']} " if rules_column else ""
        lines.append(
            f"| {row['example']} {cells}| {'×'.join(map(str, row['input_shapes'][0]))} | {us['original']} | "
            f"{us['original+compile']} | {us['fxopt']} | {us['fxopt+compile']} | **{sp['best']}** · {sp['eager']} · "
            f"{sp['compiled']} | {size['params_before'] / size['params_after']:.1f} | "
            f"{size['flops_before'] / size['flops_after']:.2f} | {acc['cosine']:.3f} | {top1} |")
    return lines + ["", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


def layerwise_cnn(r: dict) -> list[str]:
    st = r["settings"]
    lines = [
        f"## Layer-wise training of efficient convolutions (Zeng & Tian 2017, in small; CPU; seed {st['seed']})", "",
        machine(r["run"]), "",
        f"Each model is trained here ({st['train']} generated shape/texture images, 32×32, {st['epochs']} epochs,",
        f"seed {st['seed']}), then compressed by fxopt: every conv but the stem → `{st['substitute']}` "
        f"(reduction {st['reduction']:g}),",
        f"gated at `require_speedup: 1.2`, {st['layerwise_steps']} layer-wise steps per site and "
        f"{st['distill_steps']} distillation steps on",
        f"{st['calib_batches']} unlabelled training batches of 64. Accuracy on {st['test']} test images from another "
        "seed. Latency: batch",
        f"{st['batch']}, original and rewritten model measured side by side; speed-up **best against best** · "
        "eager against eager · compiled against compiled.", "",
        "| model | accuracy % (original → fxopt) | original µs | original+compile µs | fxopt µs | fxopt+compile µs | "
        "speed-up | params÷ | conv/linear FLOPs÷ | sites applied |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        us, sp, acc = row["us"], row["speedup"], row["accuracy"]
        applied = sum(s["status"] == "applied" for s in row["sites"])
        lines.append(
            f"| {row['model']}-style | {acc['original']:.2f} → {acc['fxopt']:.2f} ({acc['change']:+.2f}) | "
            f"{us['original']} | {us['original+compile']} | {us['fxopt']} | {us['fxopt+compile']} | "
            f"**{sp['best']}** · {sp['eager']} · {sp['compiled']} | {row['params'][0] / row['params'][1]:.1f} | "
            f"{row['conv_linear_flops'][0] / row['conv_linear_flops'][1]:.1f} | {applied} of {len(row['sites'])} |")
    return lines + ["", f"Raw numbers, per site: `benchmarks/results/{r['file']}`.", ""]


def binary_digits(r: dict) -> list[str]:
    st = r["settings"]
    lines = [
        "## Training with binarized weights: scikit-learn's digits (CPU)", "", machine(r), "",
        f"`benchmarks/binary_digits.py`: {st['split']} (1,347 training and 450 test images, so one",
        f"image is 0.22 points); Adam, lr {st['lr']}, cosine schedule, {st['epochs']} epochs, batch {st['batch']}; every",
        "Linear/Conv binarized (first and last included), batch norm in both models. Each seed sets the",
        "initialisation and the batch order, the same for the three ways. The binary models are scored",
        "after packing (1 bit per weight); `bytes` is the whole model's parameters and buffers.", "",
        "| model | way | " + " | ".join(f"seed {s}" for s in st["seeds"]) + " | mean | vs fp32 | bytes |",
        "|---|---|" + "---|" * len(st["seeds"]) + "---|---|---|",
    ]
    for key, summary in r["summary"].items():
        model, way = key.split("/")
        runs = {x["seed"]: x for x in r["runs"] if x["model"] == model and x["way"] == way}
        gap = f"{-summary['gap_to_fp32']:+.2f} pt".replace("-", "−") if "gap_to_fp32" in summary else "—"
        lines.append(f"| {model} | {way} | " + " | ".join(f"{runs[s]['test_accuracy']:.2f}" for s in st["seeds"])
                     + f" | **{summary['mean']:.2f}** | {gap} | {runs[st['seeds'][0]]['bytes']:,} |")
    return lines + ["", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


def rescale_cnn(r: dict) -> list[str]:
    st = r["settings"]
    if "full_epochs" in st:  # the rescaled run's epochs and schedule set on their own
        plan = [f"images; SGD either {st['epochs']} epochs at full resolution (lr {st['lr']}, cosine) or {st['low_epochs']} at",
                f"1/{st['factor']:g} resolution with rescaled kernels (lr {st['lr']}, cosine), batch-norm statistics re-estimated "
                f"on {st['bn_images']:,} training images, then {st['full_epochs']} at full resolution (a fresh cosine from lr "
                f"{st['lr'] * st['full_lr']:g}); same initialisation.",
                "`carried up` is the test accuracy of the carried-up model, `recalibrated` the same after the re-estimation: "
                "the model the full-resolution phase starts from."]
    else:
        plan = [f"images; {st['epochs']} epochs of SGD (lr {st['lr']}, cosine) either all at full resolution or {st['low_epochs']} at",
                f"1/{st['factor']:g} resolution with rescaled kernels, then the rest at full resolution; same initialisation.",
                "`carried up` is the test accuracy of the model the full-resolution phase starts from. This first experiment "
                "was written to `rescale_cnn_cpu.json`, renamed since; its models keep 3×3 kernels, which do not rescale."]
    models = ", ".join(dict.fromkeys(x["model"] for x in r["rows"]))
    again = st.get("replicates", 0) > 0  # one more column: the full-resolution run again, other batch orders
    columns = ["model", "seed", "full: accuracy · seconds", *(["full again (other batch order)"] if again else []),
               "rescaled: accuracy · seconds (low + full)", "time saved", "accuracy change",
               "low-res accuracy → carried up (→ recalibrated)"]
    lines = [
        f"## Kernel rescaling: low-resolution start against full-resolution training (CPU): {models}", "", machine(r), "",
        f"`benchmarks/rescale_cnn.py`: shapes task at {st['size']}×{st['size']}, {st['train']:,} training and {st['test']:,} test",
        *plan, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
    ]
    for x in r["rows"]:
        f, rs = x["full"], x["rescaled"]
        low, full = rs["phases"]
        recal = f" → {rs['recalibrated_test_accuracy']:.2f}%" if rs.get("recalibrated_test_accuracy") is not None else ""
        rep = " ".join(f"{a['test_accuracy']:.2f}% ({d:+.2f} pt)" for a, d in zip(x.get("replicates", []),
                                                                                x.get("replicate_change", [])))
        lines.append(f"| {x['model']} | {x['seed']} | {f['test_accuracy']:.2f}% · {f['seconds']:.1f} s | "
                     + (f"{rep} | " if again else "")
                     + f"{rs['test_accuracy']:.2f}% · {rs['seconds']:.1f} s ({low['seconds']:.1f} + {full['seconds']:.1f}) | "
                     f"{x['time_saved'] * 100:.0f}% | {x['accuracy_change']:+.2f} pt | "
                     f"{rs['low_resolution_test_accuracy']:.2f}% → {rs['carried_up_test_accuracy']:.2f}%{recal} |")
    if "summary" in r:
        lines += ["", "Over seeds (95% intervals: Student's t over the per-seed differences):", "",
                  "| model | seeds | time saved: mean (range) | accuracy change: mean [95% CI] | "
                  "full again − full: mean [95% CI], largest |Δ| |", "|---|---|---|---|---|"]
        for model, m in r["summary"].items():
            t, a, n = m["time_saved"], m["accuracy_change"], m.get("replicate_change")
            noise = f"{_ci(n)}, {n['max_abs']:.2f} pt" if n else "—"
            lines.append(f"| {model} | {len(m['seeds'])} | {t['mean'] * 100:.0f}% ({t['min'] * 100:.0f}–{t['max'] * 100:.0f}%) | "
                         f"{_ci(a)} | {noise} |")
    return lines + ["", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


def _ci(stat: dict) -> str:
    """`+0.12 pt [−0.40, +0.64]` (the interval when there are two values or more)."""
    text = f"{stat['mean']:+.2f} pt" + (f" [{stat['ci95'][0]:+.2f}, {stat['ci95'][1]:+.2f}]" if "ci95" in stat else "")
    return text.replace("-", "−")


def backend(r: dict) -> list[str]:
    lines = [
        "## The torch.compile backend against plain torch.compile (CPU)", "", machine(r), "",
        "`benchmarks/backend.py`: each example compiled three ways in one process (fresh copies):",
        "Inductor alone, `backend=\"fxopt\"` with a rule that matches nothing (what the backend costs),",
        "and `backend=\"fxopt\"` with `rules/kron.yaml` (rewritten, then Inductor). Steady-state medians;",
        "ratios are Inductor's time over the variant's (> 1 is faster). Compile times are first calls and",
        "benefit from Inductor's on-disk cache where a graph was compiled before.", "",
        "| example | inductor µs | fxopt, no match µs (vs inductor) | fxopt, kron µs (vs inductor) | compile s: inductor · no match · kron |",
        "|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        us, vs, c = x["us"], x["vs_inductor"], x["compile_s"]
        lines.append(f"| {x['example']} | {us['inductor']} | {us['fxopt, no match']} ({vs['fxopt, no match']}×) | "
                     f"{us['fxopt, kron']} ({vs['fxopt, kron']}×) | {c['inductor']} · {c['fxopt, no match']} · {c['fxopt, kron']} |")
    return lines + ["", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


INDEX = {"inputs": "class input means", "weights": "weight rows"}  # what a WTA layer's tables hash per class


def wta_hash(r: dict) -> list[str]:
    p = r["rows"][0]["params"]
    lines = [
        "## WTA-hashed output layer against the dense layer (CPU)", "", machine(r), "",
        f"`benchmarks/wta_hash.py`: data from `{r['data']['generator']}` (prototype families of {r['data']['family']}, "
        f"spread {r['data']['spread']}, input noise {r['data']['noise']}); hashing k {p['k']}, {p['num_hashes']} codes in "
        f"{p['bands']} bands, {p['candidates']} candidates, tables rebuilt every {p['rebuild_every']} steps. Recall: share of",
        "fresh inputs whose dense top-1 (top-5) classes are candidates. Training step: forward, loss, backward and SGD step",
        "(hashed: with hashing, lookup, sampled softmax, sparse rows and the amortised rebuilds), mean over the timed steps.",
        "Inference: the full (N, C) output, medians; `compiled` is `torch.compile` of the dense layer.", "",
        "| classes | recall@1 | recall@5 | train step ms dense → hashed (×) | batch 1 ms dense · compiled → hashed (×) "
        "| batch 16 ms dense · compiled → hashed (×) | table build s |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        t, i1, i16 = x["train_step"], x["inference"]["batch_1"], x["inference"]["batch_16"]
        lines.append(f"| {x['classes']:,} | {x['recall']['recall_at_1']:.3f} | {x['recall']['recall_at_5']:.3f} | "
                     f"{t['dense_step_ms']:.1f} → {t['wta_step_ms']:.1f} ({t['speedup']:.2f}×) | "
                     f"{i1['dense_ms']:.2f} · {i1['compiled_ms']:.2f} → {i1['wta_ms']:.2f} ({i1['speedup_vs_dense']:.1f}×) | "
                     f"{i16['dense_ms']:.2f} · {i16['compiled_ms']:.2f} → {i16['wta_ms']:.2f} ({i16['speedup_vs_dense']:.1f}×) | "
                     f"{x['table_build_s']:.1f} |")
    for x in r["rows"]:
        if "training" in x:
            tr = x["training"]
            other = "weights" if tr["index"] == "inputs" else "inputs"
            o = tr[f"with_{other}_index"]
            lines += ["", f"Training both ways at {x['classes']:,} classes from the same initialisation (no bias), "
                      f"{tr['steps']} SGD steps of batch {tr['batch']} (lr {tr['lr']:g}, Zipf {tr['zipf']:g} labels), scored on "
                      f"fresh samples: dense {tr['dense_accuracy']:.3f}; hashed with an index of {INDEX[tr['index']]}: "
                      f"{tr['wta_accuracy']:.3f} through its index (gap {tr['gap_points']:.2f} points; its own index finds "
                      f"its top class for {tr['wta_own_index_recall']['recall_at_1']:.3f} of the inputs), "
                      f"{tr['wta_trained_exact_accuracy']:.3f} with its weights computed densely; hashed with an index of "
                      f"{INDEX[other]}: {o['accuracy']:.3f} through its index, {o['exact_accuracy']:.3f} densely. An index "
                      f"over the dense-trained head's weights finds its top class for "
                      f"{tr['recall_on_dense_trained_head']['recall_at_1']:.3f} of the inputs. Seconds spent training: "
                      f"dense {tr['dense_seconds']:.0f}, hashed {tr['wta_seconds']:.0f} and {o['seconds']:.0f}."]
    return lines + ["", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


def minilm_recover(r: dict) -> list[str]:
    rows = r["rows"]
    first = rows[0]
    lines = ["## A pretrained transformer, recovered (all-MiniLM-L6-v2)", "",
             f"{r['model']}: {first['model_params_before']:,} parameters, "
             f"{(first['model_params_before'] - max(row['site_params_before'] for row in rows)) / 1e6:.1f} M of them "
             "outside every rewritten linear layer (embeddings, layer norms, the pooler). Held-out: the cosine "
             "between each of "
             f"{first['heldout_sentences']:,} sentences' embeddings from the saved program and from the original "
             f"(sentences the calibration never saw; batches of {r['batch']} × {r['seq']} tokens). Layer-wise lr "
             f"{r['layerwise_lr']:g}, distillation lr {r['distill_lr']:g} with per-layer targets at weight "
             f"{r.get('distill_sites', 0):g}. BERT's pooler, which the sentence embedding never reads, is `unused`.",
             "", machine(r), "",
             "| rules | rewritten layers: params | model params | layer-wise steps | distillation steps "
             "| held-out cosine, mean | 5th percentile | min | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| `{row.get('rules', r.get('rules'))}` | {row['sites']['applied']} layers, "
                     f"{row['site_params_before'] / 1e6:.2f} M → {row['site_params_after'] / 1e6:.2f} M "
                     f"({row['site_params_ratio']:.2f}× fewer) | {row['model_params_before'] / 1e6:.1f} M → "
                     f"{row['model_params_after'] / 1e6:.1f} M | {row['layerwise_steps']} | {row['distill_steps']} "
                     f"| {row['heldout_cosine_mean']:.4f} | {row['heldout_cosine_p5']:.4f} "
                     f"| {row['heldout_cosine_min']:.4f} | {row['seconds']:.0f} s |")
    return lines + ["", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


def binary_cpu(r: dict) -> list[str]:
    lines = [f"## Packed 1-bit and ternary linear layers against dense fp32 (CPU: {r['machine']['cpu']})", "",
             machine(r), ""] + ([r["note"], ""] if "note" in r else []) + [
             "`benchmarks/binary_cpu.py`: the packed layer as `fxopt optimize` saves it (1 bit per weight; ternary 2) "
             "against `nn.Linear` in fp32, best against best (the faster of eager and `torch.compile` on each side), "
             "> 1 meaning faster. **exact**: the default (within fp32 rounding of the dense layer). **int8**: "
             "`activations: int8` (each input row quantized to int8). In brackets, the route the layer's timed "
             "choice took: **bits** (a loop over the packed words, fp32"
             + {"avx512-lut": ": here the AVX-512 kernel, table lookups, one permute per 64 weights, at any batch size",
                "avx512": ", up to 8 rows: here the AVX-512 kernel, one masked add per 16 weights",
                "inductor": ", up to 8 rows: here Inductor's compiled loop"}.get(r.get("bits_kernel"), ", up to 8 rows")
             + "), **int8** (oneDNN's "
             "int8 GEMM; exact activations as three int8 planes whose integer products are exact), **fp32** (an fp32 "
             "copy of the ±1 weight). **reference**: the torch reference that unpacks every weight at every call (what "
             "a CPU ran before). Dense times in µs.", "",
             "| out × in | batch | dense µs | binary exact | binary int8 | ternary exact | ternary int8 | reference |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        dense = min(x["us"]["dense"], x["us"]["dense+compile"])
        ref = f"{x['reference']:.2f}×" if "reference" in x else "—"
        routes = x.get("routes", {})

        def cell(form: str) -> str:
            took = "+".join({"dense": "fp32"}.get(r, r) for r in routes.get(form, []))
            return f"{x[form]:.2f}×" + (f" ({took})" if took else "")

        lines.append(f"| {x['out']} × {x['in']} | {x['batch']} | {dense:,.0f} | {cell('binary')} | {cell('binary_int8')} "
                     f"| {cell('ternary')} | {cell('ternary_int8')} | {ref} |")
    return lines + ["", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


def layerwise_distributed(r: dict) -> list[str]:
    one, two = r["configs"]
    distill = r.get("distill_steps")
    lines = [f"## Layer-wise training and distillation across processes (CPU: {r['machine']['cpu']})", "", machine(r), ""
             ] + ([r["note"], ""] if "note" in r else []) + [
             f"`benchmarks/layerwise_distributed.py`: `fxopt optimize MODEL --rules {r['rules']} --layerwise-steps "
             f"{r['steps']}" + (f" --distill-steps {distill}" if distill else "") + " --no-time-sites`, "
             f"{one} against `--nproc 2` ({two}, under torchrun), run alternately; medians. The stages as "
             "process 0's report times them: layer-wise (recording the sites' values, measuring step costs, "
             "training, gathering the trained substitutes) and distillation (data parallel); the whole command "
             "includes starting the processes.", "",
             f"| model | sites trained | layer-wise stage: {one} | {two} | ratio | distillation ratio "
             "| whole command ratio |",
             "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        m = x["median"]
        ratio = f"{x['distill_ratio']:.2f}×" if x.get("distill_ratio") else "—"
        lines.append(f"| {x['model']} | {x['sites_trained']} | {m[one]['layerwise_s']:.2f} s | {m[two]['layerwise_s']:.2f} s "
                     f"| {x['layerwise_ratio']:.2f}× | {ratio} | {x['command_ratio']:.2f}× |")
    return lines + ["", f"Raw numbers: `benchmarks/results/{r['file']}`.", ""]


def budget_digits(r: dict) -> list[str]:
    lines = ["## The accuracy budget against per-site tolerances (CPU)", "", machine(r), "",
             f"`benchmarks/budget_digits.py`: the demo model (`{r['model']}`, a trained digit classifier; its "
             "`evaluate()` is accuracy on 450 held-out images), every linear layer but the head as a low-rank pair at "
             f"`max_flops_ratio` r, a budget of {r['budget_points']:g} point of held-out accuracy. **search**: no per-site "
             "tolerance, `enforce: true` rolls back the most harmful sites as measured on `evaluate()`, then gives each back "
             "at the most compressive rung of its ladder that the budget affords (rung k: `max_flops_ratio` r·2^k, up to 4 "
             "rungs; the applied layers are listed with their final ratio). **best tolerance**: "
             f"of {len(r['cosines'])} runs with one per-site `cosine` tolerance each ({', '.join(map(str, r['cosines']))}), "
             "no search, the one that saves the most parameters while the saved model meets the budget (chosen in "
             "hindsight, on the held-out metric).", "",
             "| r | search: parameters saved · accuracy change · layers applied · evaluations | best tolerance: cosine · "
             "parameters saved · accuracy change · layers applied |", "|---|---|---|"]
    for x in r["rows"]:
        s, b = x["search"], x["best"]
        best = (f"{x['best_tolerance']} · {b['params_saved']:,} · {-b['drop'] + 0.0:+.2f} pt · {', '.join(b['applied']) or 'none'}"
                if b else "none meets the budget")
        applied = ", ".join(f"{k} ({v:g})" for k, v in s["max_flops_ratio"].items()) if "max_flops_ratio" in s \
            else ", ".join(s["applied"])
        lines.append(f"| {x['ratio']:g} | {s['params_saved']:,} · {-s['drop'] + 0.0:+.2f} pt · {applied or 'none'} "
                     f"· {s['evaluations']} | {best} |")
    if o := r.get("best_of_sweep"):
        lines += ["", f"Best (r, tolerance) pair of the whole sweep, as a user tuning both by hand with the held-out "
                      f"metric in view would find: r {o['ratio']:g}, cosine {o['cosine']}: {o['params_saved']:,} "
                      f"parameters saved, {-o['drop'] + 0.0:+.2f} pt."]
    return lines + ["", f"Raw numbers (every tolerance's run too): `benchmarks/results/{r['file']}`.", ""]


def main() -> None:
    out = ["# Benchmarks", "",
           "Generated by `make bench` (the scripts in `benchmarks/`, then `benchmarks/render.py`); do not",
           "edit by hand. Every ratio compares variants measured side by side in one process, on the",
           "machine named with it. No GPU figures yet: no GPU was available to run the kernels. Timings under the Triton",
           "interpreter are never quoted.", ""]
    files = [("kron_linear_cpu.json", kron_linear), ("kron_linear_large_cpu.json", kron_linear_large),
             ("kron_linear_large_cpu_xeon.json", kron_linear_large),
             ("kron_build_cpu.json", kron_build), ("kron_trained_cpu.json", kron_trained),
             ("kron_trained_digits_cpu.json", kron_trained),
             ("examples_cpu.json", examples), ("examples_cpu_xeon.json", examples),
             ("examples_efficient_cpu.json", examples_efficient)]
    files += [(p.name, layerwise_cnn) for p in sorted(RESULTS.glob("layerwise_cnn*_cpu.json"))]  # one per seed
    files += [("layerwise_distributed_cpu.json", layerwise_distributed),
              ("layerwise_distributed_epyc_cpu.json", layerwise_distributed)]
    files += [("binary_cpu.json", binary_cpu), ("binary_cpu_xeon.json", binary_cpu), ("binary_digits_cpu.json", binary_digits),
              ("budget_digits_cpu.json", budget_digits)]
    files += [(f"rescale_cnn_{name}cpu.json", rescale_cnn)  # the five-seed runs first
              for name in ("5seeds_", "5seeds_fulllr1_", "resnet_dw_heldout_", "", "resnet_dw_5full_", "resnet_dw_6low_", "3x3_")]
    files += [("backend_cpu.json", backend), ("wta_hash_cpu.json", wta_hash), ("minilm_recover_cpu.json", minilm_recover)]
    for name, fmt in files:
        path = RESULTS / name
        if path.is_file():
            out += fmt(json.loads(path.read_text()) | {"file": name})
    print("\n".join(out))


if __name__ == "__main__":
    main()
