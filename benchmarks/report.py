"""Render benchmarks/RESULTS.md from the stored results (one section per benchmark)."""

from __future__ import annotations

import importlib
from typing import Any

from benchmarks.util import fmt, md_table

# headline key -> (comparison, target) ; None: reported without a target
TARGETS: dict[str, tuple[str, float] | None] = {
    "heart_mean_centre_acc_global": (">=", 0.76),
    "heart_mean_centre_acc_personalised": (">=", 0.80),
    "heart_mean_centre_balanced_acc_personalised": (">=", 0.78),
    "heart_min_site_balanced_acc_gain": (">=", 0.0),
    "breast_auc_federated": (">=", 0.90),
    "breast_auc_gain_pretrained_vs_scratch": (">=", 0.02),
    "breast_minutes_cpu": ("<=", 10.0),
    "gpu_check": None,
    "sim_cpu_ratio_100": ("<=", 1.5),
    "sim_cpu_ratio_1000": ("<=", 2.0),
    "sim_cpu_ratio_100_evaluate_with_train": ("<=", 1.5),
    "sim_cpu_ratio_1000_evaluate_with_train": ("<=", 2.0),
    "plain_flower_cpu_ratio_100": None,  # the same work in plain Flower / bare: the runtime's
    "plain_flower_cpu_ratio_1000": None,
    "sim_cpu_ratio_100_vs_plain_flower": None,  # evaluate_with_train / plain Flower: medfed's
    "sim_cpu_ratio_1000_vs_plain_flower": None,
    "max_hospitals_simulated": (">=", 10000),
    "max_hospitals_sampled_fraction": None,
    "peak_rss_gb_max_hospitals": ("<=", 6.0),
    "upload_bytes_ratio": ("<=", 1.05),
    "backbone_sends_per_node": ("<=", 1),
    "feature_cache_speedup": (">=", 10.0),
    "tls_latency_ratio": ("<=", 1.1),
    "defence_cost_share_of_round": ("<=", 0.05),
    "deploy_round_ratio_vs_flower": ("<=", 1.2),
    "make_test_seconds_idle": ("<=", 720),
    "make_test_seconds_loaded": None,
    "make_test_loaded_load_1min_mean": None,
}
TITLES = {
    "heart": "1. Fed-Heart-Disease (FLamby protocol)",
    "breast": "2. BreastMNIST transfer from PneumoniaMNIST",
    "overhead": "3. Simulation overhead",
    "scale": "3b. The most hospitals simulated",
    "communication": "4. Communication",
    "feature_cache": "5. Feature cache",
    "deployment": "6. Deployment on loopback",
    "deploy_vs_flower": "6b. A deployment round against a plain Flower app's",
    "defences": "7. Defences: what the reply checks cost",
    "test_suite": "8. The test suite, idle and under load",
}
NOTES = {
    "heart": (
        "Honest protocol: FLamby's test splits chose nothing. Validation is a stratified, "
        "seeded fifth of each centre's FLamby train split; it picks the sweep settings, the "
        "version each run keeps (`best` by validation AUC), each centre's site model (adapted "
        "only when better on its validation log-loss, early-stopped, pulled toward the global "
        "weights; Switzerland's all-positive training split gets a bounded intercept shift), "
        "its calibration and threshold, and the headline rows. Local-only rows train one "
        "model per centre with the federation's step budget (rounds x local steps); pooled "
        "rows train one model on the four site-normalised train splits with four times that "
        "budget; they make no choices. The majority row predicts each centre's majority class "
        "of its training split: its balanced accuracy is 0.5 by construction, and it is what "
        "an accuracy-only headline would reward at Switzerland and VA. FLamby's published "
        "figures (logistic regression from scratch) are mean-over-centres accuracy only; "
        "compare them with the first column only. Earlier figures in this file were tuned on "
        "the test splits; they are gone."
    ),
    "breast": (
        "Every choice is made on BreastMNIST's official val split as the hospitals hold it: "
        "the recipe of configs/breast.yaml (`benchmarks/results/breast_sweep.json`: a first "
        "sweep of 23 runs of the full fine-tuning row chose augmentation and the bundle's "
        "normalisation statistics; a second, of the small CNN's row over 3 seeds, chose the "
        "budget of 160 rounds: mean validation AUC 0.870 at 40 rounds, 0.889 at 80, 0.900 at "
        "120, 0.905 at 160, against 0.860 for 8 pretraining epochs, 0.849 for a wider CNN "
        "and 0.875 for 40 local steps; a fourth, on 2026-12-05, chose 10 head-only rounds "
        "before full fine-tuning (`federation.head_warmup_rounds`): 0.908 against 0.905 "
        "without and 0.888 with 20, a lead the rule takes but the seeds cannot tell apart: "
        "per seed +0.008, -0.027, +0.026), the version each run keeps (`best` by the sites' "
        "validation AUC), the headline row (highest mean validation AUC over the seeds, 5 "
        "hospitals, among the federated rows from the pretrained bundle; it sets "
        "configs/breast.yaml: the small CNN, 160 rounds, 10 head-only rounds first) and the "
        "scratch row of the pretrained-vs-scratch gain (the same model family and rounds from "
        "scratch, with or without the warm-up, whichever has the higher validation AUC). "
        "**Rule changed on 2026-12-05, after the results below were seen:** the headline "
        "used to be chosen among all federated rows, scratch rows included. The from-scratch "
        "row with the warm-up then led on validation (0.912; with the exact emulation it "
        "still does, 0.918 against 0.913) and would have been the headline, at 0.892 test "
        "AUC (0.893 now; a miss of the 0.90 target). medfed has no from-scratch "
        "mode, so `medfed simulate` cannot run that row and configs/breast.yaml cannot hold "
        "it (the benchmark's 'real run of the headline row' ran the pretrained setting under "
        "the scratch row's name; that record is replaced). Scratch rows are now comparators "
        "only. Judge the headline with that in mind. The test split (156 images: 42 "
        "malignant) is only reported; its AUC "
        "interval is a 95% bootstrap over test images, averaged over seeds. The first five "
        "runs of the first sweep also printed test AUC (nothing was chosen on it; disclosed "
        "in the sweep file). Class 1, the positive class of sensitivity and specificity, is "
        "**malignant** (MedMNIST's file numbers it 0; medfed reads it the other way round "
        "since 2026-12-04). The run of 2026-12-04 is the first with that order; it also "
        "changes each seed's Dirichlet split (the split draws per class), so its rows are not "
        "comparable run-to-run with the earlier figures (then: full fine-tuning of the "
        "residual CNN 0.829, small CNN 0.847, from scratch 0.823 test AUC at 5 hospitals). "
        "'Head only' trains the head on frozen pretrained features (cached, no "
        "augmentation); '+ last stage' also trains the last residual stage; 'full "
        "fine-tuning' trains everything from the pretrained weights; 'from scratch' trains "
        "everything from a random initialisation with the same preprocessing. The small CNN "
        "(three conv blocks, ~24 k parameters) and the residual CNN (~77 k) use the same "
        "recipe. The centralised row trains the residual CNN on the same images the "
        "hospitals train on, pooled, for as many steps as all hospitals together in 40 "
        "rounds: it is not a ceiling for the 160-round rows. The MedMNIST reference is a "
        "ResNet-18 (11 M parameters) on the whole train split. 20 hospitals run 4x the local "
        "steps of 5. Rows added after the first table with `python -m benchmarks.breast "
        "--add-rows` (the same code and machine): 'the small CNN from scratch' (9 minutes) "
        "and the two 160-round rows (5 hospitals on 2026-12-04, 12 minutes; 20 hospitals on "
        "2026-12-05, 33 minutes, 13 of them beside a `make test` run; `--add-rows` kept the "
        "stored 5-hospital runs of the same overrides and seeds), then the two warm-up rows "
        "(2026-12-05 evening, 38 minutes; the rows before them ran no warm-up, the option did "
        "not exist, and their overrides now say so). The real `medfed simulate` of the "
        "headline row runs twice: since 2026-12-05 both runs keep the same version, byte for "
        "byte (the server sums updates in hospital-name order, not arrival order; before, two "
        "runs of the same command kept versions 153 and 87, test AUC 0.915 and 0.917). The "
        "emulation is the runtime bit for bit since 2026-12-05 (evening): it used to "
        "average the hospitals' updates in float64, where Flower's FedAvg sums float32 "
        "products in site order, ~1e-7 apart per round; over 160 rounds that changed the "
        "version kept (seed 0 of the headline row: 112 emulated on this machine, 145 real). "
        "Now it does Flower's arithmetic operation for operation: the emulated seed 0 keeps "
        "version 145, and all 160 of its versions equal the real run's registry tensor for "
        "tensor (checked by hand; tests/test_emulation_exact.py compares every version of a "
        "short real in-process run, FedAvg and FedYogi). The rows were run again with it "
        "(every federated row, at 5 and 20 hospitals; ‡ would mark one that was not). Most "
        "figures moved by less than the seeds' spread (headline 0.901 then and now; its "
        "scratch row 0.892, now 0.893); the 20-hospital gains fell (160 rounds with the "
        "warm-up: +0.041 to +0.033; 40 rounds: +0.057 to +0.036). The rows "
        "stored before had come from another machine and bundle: the same code, float64 "
        "averaging, kept version 93 for that seed there and 112 here; PyTorch's float "
        "kernels can differ between CPU types, so figures repeat on one kind of CPU. "
        "A fifth sweep "
        "(2026-12-05, the headline row, 3 seeds) tried longer PneumoniaMNIST pretraining: 12 "
        "and 24 epochs gave mean validation AUC 0.889 and 0.889 against 0.908 at 4, so "
        "configs/breast.yaml keeps 4. A sixth sweep (2026-12-07, the headline row, 3 seeds, "
        "`python -m benchmarks.pretrain_sources`: issue 14's optional pretraining on several "
        "shipped sets, here PneumoniaMNIST and RetinaMNIST's fundus photographs in grey, never "
        "the target) tried: both sets supervised at once, one head over their 2 + 5 classes "
        "(mean validation AUC 0.894); SimCLR's contrastive loss on both for 1000 steps, then "
        "a PneumoniaMNIST head (0.906); the same followed by PneumoniaMNIST's supervised "
        "recipe (0.897); SimCLR for 3000 steps (0.909); against 0.908 for configs/breast.yaml's "
        "recipe run beside them on this machine, an AMD EPYC (the stored row's 0.913 ran on "
        "an Intel Xeon). The rule (the highest mean over the seeds, against that control; "
        "written after the first three variants' means were seen and before the last two "
        "finished) takes SimCLR for 3000 steps, by 0.001 (per seed -0.013, "
        "+0.049, -0.032: three seeds cannot tell them apart). Seeds 3 and 4, run after the "
        "rule had picked and kept apart from it, lean the same way: 0.907 and 0.909 for the "
        "control, 0.940 and 0.950 for SimCLR; over five seeds 0.908 against 0.923 (paired "
        "differences -0.013, +0.049, -0.032, +0.032, +0.041). `medfed pretrain` then gained "
        "the recipe (`pretrain.objective: simclr`, `pretrain.contrastive.also_medmnist: "
        "[retina]`, 3000 steps; common/contrastive.py), and run as medfed runs it, it is what "
        "decides: **0.897** over seeds 0-2 (0.936, 0.862, 0.894) against the control's 0.908, "
        "so it is **not adopted** and configs/breast.yaml keeps the supervised PneumoniaMNIST "
        "recipe (the rows above stand as recorded). The prototype differed only in its random "
        "draws (its model was built with a 7-output head before the projection); its lead of "
        "0.001 did not survive them. Seeds 3 and 4 of medfed's recipe, kept apart: 0.923 and "
        "0.906; over seeds 0-4 0.904 against the control's 0.908 and the prototype's 0.923 "
        "(paired with the control -0.023, +0.037, -0.045, +0.016, -0.003): the seeds move the "
        "figure more than the recipe does. No test figure of these backbones was computed "
        "into any output. Also tried "
        "on validation and not kept: the balanced-softmax loss (`federation.local.loss`), "
        "FedProx (mu 0.01), FedAdam (eta 0.003), 10 local steps x 60 rounds, learning rates "
        "0.001 and 0.004, a wider residual CNN (32-64-128), and (third sweep, 2026-12-05) "
        "a gentler rate for the pretrained backbone than for the head in the headline row "
        "(`federation.local.backbone_lr_scale` 0.3 and 0.1: mean validation AUC 0.886 and "
        "0.852 against 0.905 at 1), so pretraining's advantage at 160 rounds is not held "
        "back by fine-tuning overwriting it. Sensitivity, specificity and "
        "balanced accuracy are at the global model's default threshold 0.5 (no calibration "
        "in this benchmark): there the headline global model finds fewer than half of the "
        "malignant images (sensitivity 0.452) while its AUC is 0.901, so it is not a usable "
        "classifier until a hospital fits its threshold on validation "
        "(`operating_point.threshold`, e.g. `sensitivity>=0.9`; the site models do); the "
        "frozen-backbone head answers benign on every image (balanced accuracy 0.500). "
        "Targets: federated test AUC 0.901 [0.838, 0.954] against 0.90, **met by 0.001** "
        "(by the mean only: the interval's lower end is 0.838, and with 156 test images the "
        "target is not met with confidence). Run again on an AMD EPYC (2026-12-07, "
        "`python -m benchmarks.breast --more-seeds cnn-all-160-warmup,cnn-scratch-160-warmup "
        "--seeds 0,1,2,3,4`, kept apart: it chooses nothing), the same row gives 0.898 over "
        "seeds 0-2 (the table's 0.901 ran on an Intel Xeon; the validation figures and the "
        "versions kept differ too) and **0.899 over seeds 0-4, below 0.90**; its gain over "
        "the scratch row is +0.013 over seeds 0-2 and +0.007 ± 0.012 over five (per seed "
        "+0.014, +0.002, +0.021, +0.008, -0.011). So the AUC target is met on one CPU type "
        "and missed on another, by less than the seeds' spread: the headline sits at 0.90, "
        "not above it. The pretrained-vs-scratch gain at equal rounds "
        "(the small CNN, 5 hospitals, 160 rounds, both with the warm-up) is +0.009 against "
        "0.02, **missed by 0.011** (0.901 vs 0.893 [0.829, 0.948]). Without the warm-up it "
        "is +0.012 (0.896 vs 0.884; +0.019 in the float64 emulation). At 40 rounds it is "
        "+0.038 (0.877 vs 0.839), and at 20 hospitals and 40 rounds +0.036 (0.836 vs 0.800; "
        "+0.057 in the float64 emulation). So the backbone "
        "mainly "
        "saves rounds: given 160 rounds, the small CNN from scratch catches up. At 20 "
        "hospitals the warm-up rows give 0.873 vs 0.840 (+0.033; validation 0.875 vs 0.869; "
        "+0.041 in the float64 emulation), and the rows without it 0.874 vs 0.855 (+0.018; "
        "validation 0.886 vs 0.865)."
    ),
    "overhead": (
        "Both sides run one thread per process (OMP_NUM_THREADS=MKL_NUM_THREADS=1, "
        "`torch.set_num_threads(1)` in the bare loop and the plain app). CPU time is the sum "
        "over every process of the command's tree (driver, Ray's GCS, raylet and workers), "
        "sampled every 0.1 s with psutil. This run started 20 s after a BreastMNIST benchmark"
        " and a `make test` had ended (1-min load 4.44 at the first 10-hospital repeat; "
        "1.4-2.1 at the 100- and 1000-hospital repeats, the benchmark's own). **Where the "
        "ratio comes from.** The 'plain Flower, same work' side (`benchmarks/plain_sim.py`) "
        "runs the bare loop's work per hospital (score the received model on validation and "
        "test, `train_local` with the same seed, reply the tensors) as a plain Flower app: "
        "Flower's `FedAvg`, one message per node per round, Ray started as `medfed simulate` "
        "starts it, with the same engine fixes (below), nothing of medfed's product. Its "
        "ratio to the bare loop is what Flower's simulation runtime costs on this machine: "
        "1.46 at 100 hospitals and 1.50 at 1000 in this run (1.55 and 1.68 in the run of "
        "2026-12-04 23:37, before the one-pass fix below; 1.35 and 1.62 an hour before that)."
        " So the 1.5 target at 100 hospitals is about what Flower's runtime alone reaches "
        "here. `medfed simulate` with `federation.evaluate_with_train` (the same message "
        "count) costs 1.15x the plain app at 100 hospitals and 1.08x at 1000 (second table; "
        "1.08x and 1.12x in the run before: the spread between runs is as large as the "
        "change). Per process, outside this benchmark (100 hospitals, 8 rounds, psutil per "
        "process, 2026-12-05): the plain app spends 0.99 s per round in the two Ray actors "
        "and 0.13 s in the driver, `evaluate_with_train` 1.10 s and 0.20 s, against 0.81 s "
        "for the bare loop. py-spy of the actors: Ray's task loop about 1.1 ms per message, "
        "serialisation 0.3 ms, medfed's handler beyond the bare loop's work about 0.8 ms "
        "(reply metrics, events, stamp and cache-key checks); in the driver, Flower's task "
        "submission and result fetch about 0.65 ms per message, medfed's ServerApp (reply "
        "checks, audit, signed version, history, checkpoint) about 50-70 ms per round. The "
        "default (a train and an evaluate message per node per round) costs 1.2x the "
        "one-message run: the second message pays the runtime's per-message cost again. **Fix"
        " of 2026-12-05.** Flower's `InMemoryLinkState.get_message_ins(node, limit=1)` (flwr "
        "1.42, `flwr/server/superlink/linkstate/in_memory_linkstate.py`) walks the stored "
        "messages from the start and validates each one (TTL, federation membership) until it"
        " reaches that node's; the simulation engine calls it node by node, so one exchange "
        "with N nodes costs N^2 / 2 validations even when only the nodes with a message are "
        "asked (the fix of 2026-11-22, below): 1.44 s of CPU for one exchange of 1000 nodes, "
        "measured alone. `server/flower_speedups.py::take_pending` now finds each exchange's "
        "messages in one pass over the store and runs Flower's own check once on each message"
        " it hands out (4 ms for the same exchange; same messages, nodes, order and expiry "
        "handling, tests/test_flower_speedups.py counts the checks). At 1000 hospitals the "
        "CPU ratios fell from 2.38 to 1.90 (default), 1.88 to 1.62 (`evaluate_with_train`) "
        "and 1.68 to 1.50 (plain Flower, which uses the same engine); at 100 hospitals the "
        "change is within the spread between runs (2.03, 1.68, 1.46 against 1.97, 1.67, "
        "1.55). 10,000 hospitals (section 3b): 186 s instead of 360 s (provisioning and the "
        "final delivery are exchanges with every node). **Correction of 2026-12-04.** The "
        "evaluate_with_train rows recorded before 2026-12-04 23:00 (1.55 at 100 hospitals, "
        "1.62 at 1000) were too low: in that mode version r's line in metrics.jsonl is "
        "written when round r + 1's replies bring its scores, and the last line follows an "
        "evaluation-only exchange, so the span read held one training round fewer and that "
        "exchange. The span is training rounds 2..R in both modes "
        "(tests/test_evaluate_with_train.py checks it against a real in-process run). "
        "**Earlier fixes.** Flower's engine polled its state for every node ten times a "
        "second, each poll validating every stored message "
        "(`flwr/server/superlink/fleet/vce/vce_api.py::add_messages_to_queue`): O(nodes x "
        "messages) per tick; since 2026-11-22 nodes without an undelivered message are not "
        "asked (a 1000-hospital round took 160 s of wall time before, run of 2026-11-22 on "
        "another machine); `MEDFED_STOCK_FLOWER=1` turns both engine fixes off. Ray's "
        "cloudpickle serialised the ClientApp by value with every message (Flower's "
        "`RayBackend.process_message` sends `app_fn`, a closure over the app: 46% of the "
        "driver's CPU at 100 hospitals, py-spy 2026-12-02); medfed hands Flower a loader that"
        " pickles by reference and builds the app once per actor (same file). Also gone since"
        " 2026-12-02: `torch.manual_seed` capturing a Python stack for a CUDA seeding on a "
        "CPU-only machine, the model rebuilt per message, a 64-entry cache of simulated sites"
        " that missed past 64 hospitals (now 4096), three model copies per evaluate message, "
        "and (2026-12-04) a node's backbone files checked twice per message, every path "
        "component resolved per cache lookup and a mkdir per event. "
        "`federation.evaluate_with_train` keeps each hospital's evaluation but sends it with "
        "the next round's train message (the versions and every figure are the same as with "
        "separate evaluation, to float rounding, tests/test_evaluate_with_train.py); it is "
        "not the default: a version is published a round later, `fraction_evaluate` then does"
        " not apply, and it cannot be combined with SecAgg+. Whole-run figures include "
        "start-up, provisioning and the final model's delivery to every hospital, which the "
        "plain app does not do; at 1000 hospitals much of that is each hospital reading the "
        "delivered manifest, which lists every site's scores (about 1.2 MB at 1000 sites, "
        "parsed twice per hospital). The bare loop's CPU per round moves between runs and "
        "machines (100 hospitals: 1.31 s on the afternoon of 2026-12-04, 0.81-0.85 s in the "
        "last two runs, all on an AMD EPYC; 0.91 s on an Intel Xeon): ratios compare within a"
        " run, not across runs. Peak RSS counts shared pages once per process: an upper "
        "bound."
    ),
    "scale": (
        "One run, not repeated. Every node holds its own context in Flower's in-memory state "
        "and gets the final model at the end; the sampled nodes train and evaluate. Earlier "
        "runs: 2026-12-02 on an Intel Xeon, 360 s of wall time and 500 s of CPU, rounds of "
        "17-20 s; then each exchange's messages were found in one pass over Flower's state "
        "(section 3, fix of 2026-12-05), which matters most for provisioning and the final "
        "delivery, exchanges with all 10,000 nodes: 186 s, 273 s of CPU and 3.10 GB on an "
        "AMD EPYC (2026-12-05 02:22). The run above is after the server began listing "
        "hospitals and ordering replies by name (repeatable runs, 2026-12-05 evening); it "
        "started at a 1-min load of 5.1 (a profiling run had just ended). Run right after it "
        "on the same machine, the code before that change (f4e38f8, idle start, load 0.5) "
        "took 350 s, 485 s of CPU and 3.89 GB: the ordering costs nothing visible here, and "
        "the spread between runs and machines is larger than its cost."
    ),
    "deploy_vs_flower": (
        "Both sides pay Flower's deployment floor per message phase: an idle SuperNode polls "
        "every 3 s, Flower's ServerApp Grid re-pulls missing replies every 3 s (medfed's every "
        "0.25 s since 2026-12-03: `server/delegating_grid.py`), and each message "
        "starts a fresh ClientApp process (Python + torch import; medfed's ClientApp imports "
        "0.4 s on top of torch, no scipy). medfed's round adds the reply checks, the "
        "validation check, the signed and fsynced registry version and the checkpoint; the "
        "yardstick's round adds only Flower's FedAvg. Round 1 (provisioning, first process "
        "starts) is left out on both sides. The shorter reply pull made no difference that "
        "two runs per side can show: rounds of both sides still fall on the same ~12.4 s steps "
        "(run of 2026-12-02, before it: medfed 12.9 s, Flower 12.6 s, ratio 1.03)."
    ),
    "test_suite": (
        "`python -m pytest -q` in a fresh clone after `make install` (what `make test` runs), "
        "then the same beside CPU hogs (`make test-load`: 1.5 busy loops per core). Load is the "
        "1-minute load average sampled every 15 s during the run. Since 2026-12-03 the suite "
        "runs on two pytest-xdist workers, each test file whole on one (`addopts` in "
        "pyproject.toml); before, in one process (idle 788 s, loaded 2576 s at mean load 5.8, "
        "run of 2026-12-02). The run above is of commit 4df04d8 (1297 tests), 2026-12-07 23:38 "
        "UTC, on an AMD EPYC machine; during its loaded half one extra test file (tests/"
        "test_pull.py, 79 s) ran beside it, and the load figures include it. The run before, "
        "of commit 8220e9f (1153 tests) at 14:28 UTC the same day, took 620 s idle (mean load "
        "3.1) and 1294 s loaded (mean load 6.96); with the 144 tests added since (the trust "
        "fixes of 2026-12-07 and 08) the idle run took 57 s more, 43 s under the 12 minutes. "
        "**The machine's speed moves this figure more than most "
        "changes do:** the same kind of machine ran the commit before (3ada0cc) in 818 s at "
        "12:57 UTC and in 651 s at 15:01 UTC. So the change is measured side by side, the same "
        "afternoon, each in a fresh clone after `make install`, with the machine's busy CPU "
        "over the whole run (/proc/stat): 3ada0cc 1147 passed in 651 s wall, 1044 CPU-s; "
        "15a700b (8220e9f plus one config test) 1154 passed in 550 s, 839 CPU-s: **205 CPU-s "
        "(20%) and 101 s less**. What cut it, without dropping an assertion: (1) medfed's own "
        "Adam and SGD steps (`common/optim.py`): `torch.optim` imports `torch._dynamo` the "
        "first time an optimiser is built, about 1.3 s of CPU in every process that trains, "
        "and a deployed hospital starts a fresh ClientApp process per message; the steps do "
        "torch's single-tensor operations in the same order, so the weights are bit-identical "
        "on CPU (tests/test_optim.py; a 2-round heart `medfed simulate` wrote byte-identical "
        "registry versions, metrics and site models with either); (2) FLamby's split of the "
        "shipped heart files is recorded (`common/datasets/heart_disease/flamby_splits.json`, "
        "checked equal to scikit-learn's), so the processes that load them (the CLI, the "
        "ServerApp, each simulated hospital) no longer import scikit-learn and SciPy, about "
        "1 s each. With (1) and (2) that heart simulation took 25.9 CPU-s instead of 32.8 "
        "(back to back, same machine). (3) The non-editable-install deployment and the kill -9 "
        "resume deployment are one federation "
        "(`tests/test_resume.py::test_server_from_a_non_editable_install_resumes_after_kill_9`): "
        "151 CPU-s against 180 + 124 for the two. Where the CPU went before (the whole suite in "
        "one process, the machine's busy CPU per test, 2026-12-07 morning, before that day's "
        "first trims): 1288 CPU-s; the three deployment tests 43% (full run 207, resume after "
        "kill -9 223, non-editable install 124): Flower starts a ClientApp process for every "
        "message, about 4.4 s of CPU each then (imports: torch 1.4 s, Flower 0.9 s, and "
        "`torch._dynamo` for a training message). A heart `medfed simulate` cost about 30 "
        "CPU-s whatever its rounds (two Ray actors about 7 s each, the ServerApp worker 7 s, "
        "the CLI 5 s, Ray's helper processes 3 s); the suite starts about 15. Trimmed that "
        "morning (b911363): a deployed attacker's ClientApp read the whole federation's data "
        "per message to name another site, now only for `spoof-name`; the resume deployment "
        "runs two hospitals, the dropout simulation four actors instead of eight, the "
        "under-load checks one busy loop instead of two. Earlier runs: b911363 on 2026-12-07 "
        "12:57 UTC: idle 818 s, loaded 1846 s at mean load 7.18; 2026-12-05, commit 75730da "
        "(951 tests): idle 613 s, loaded 1316 s at mean load 7.28; 2026-12-03 on an Intel Xeon "
        "(858 tests): idle 649 s, loaded 1259 s at mean load 7.67."
    ),
    "communication": (
        "Upload = array bytes in a node's training reply. Each array travels as a serialised "
        "NumPy array (a ~128-byte `.npy` header per tensor) plus its key, so the ratio to the "
        "raw tensor bytes is fixed overhead per tensor and tends to 1 as tensors grow; the "
        "head of a 16-unit MLP (136 bytes) is dominated by it. The backbone is sent once per "
        "node per run (then only its sha256); download also counts the final model delivered "
        "to every node."
    ),
    "feature_cache": (
        "The first round computes the frozen-backbone features of the local train and test "
        "splits once and stores them (`<workdir>/features/*.npz`); later rounds train the head "
        "on them."
    ),
    "deployment": (
        "Flower's polling sets the floor: an idle SuperNode polls every 3 s "
        "(`flwr/supernode/start_client_internal.py`), the ServerApp's Grid re-pulls missing "
        "replies every 3 s (`flwr/superlink/grid/http_grid.py`), SuperExec starts app "
        "processes on a 1 s poll, and every message starts a fresh ClientApp process (Python "
        "+ torch import). A round has two message phases (train, evaluate), so about 6 s plus "
        "process start-up is the floor whatever the model size. With 5 and 10 hospitals on "
        "this one 2-core machine, those per-message process starts (one per hospital) share "
        "the same 2 cores, so round time grows with the number of hospitals; at real hospitals "
        "each runs on its own machine. Wire bytes are Flower's own "
        "counters of Fleet API request/response and object sizes (HTTP and TLS framing "
        "excluded)."
    ),
    "defences": (
        "Every check a heart round's replies go through on the server (provisioning, train "
        "updates with the weight bound and both norm bounds, evaluate replies, the copies the "
        "strategy sees, the aggregate's finiteness), against the median round of the real "
        "heart simulations of benchmark 1 (rounds 2 and later). Issue 11's bound: 5% of round "
        "time."
    ),
}


def scalar(value: Any) -> Any:
    """A headline figure: a number, or {"value": number, "selected_on": ...}; a record
    without a value (the GPU check's) as one line."""
    if isinstance(value, dict):
        if "value" in value:
            return value["value"]
        return "; ".join(f"{k} {fmt(v) if isinstance(v, float) else v}"
                         for k, v in value.items())
    return value


def _field(value: Any, name: str) -> str:
    """One field of a headline record ('—' for a plain number or a missing field)."""
    return str(value.get(name, "—")) if isinstance(value, dict) else "—"


def _status(key: str, value: Any) -> str:
    target = TARGETS.get(key)
    check = value.get("more_seeds") if isinstance(value, dict) else None
    value = scalar(value)
    if value is None:
        return "not measured"
    if target is None:
        return "—"
    op, bound = target

    def verdict(v: float) -> str:
        return "met" if (v >= bound if op == ">=" else v <= bound) else "MISSED"

    text = f"{verdict(value)} ({op} {bound:g})"
    if check:  # the same rows over more seeds, run apart: read the target against both
        text += (f"; seeds {', '.join(map(str, check['seeds']))} on {check['cpu']}, kept "
                 f"apart: {fmt(check['value'])}, {verdict(check['value'])}")
    return text


def render(results: dict[str, dict[str, Any]], head: dict[str, Any],
           gpu: dict[str, Any] | None = None) -> str:
    """The whole RESULTS.md; `gpu`: the GPU check's whole record, if it was run."""
    m = head["machine"]
    quick = any(r.get("quick") for r in results.values())
    lines = [
        "# medfed benchmarks" + (" (QUICK run: small sizes, not the reference numbers)"
                                 if quick else ""),
        "",
        "Regenerate with `make bench` (full, see the wall time below) or `make bench QUICK=1` "
        "(under 10 minutes; writes to `benchmarks/results/tmp/quick/` and leaves these "
        "numbers alone). Raw figures: `benchmarks/results/*.json`; headline: "
        "`benchmarks/results/headline.json`.",
        "",
        f"- commands: `{head['command']}`; latest benchmark started (UTC): {head['date']}; "
        f"wall time (sum over the benchmarks below): {fmt(head.get('total_wall_s'), 0)} s",
        "- machine of the latest benchmark (each section names its own CPU): "
        f"{m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gb']} GB RAM, "
        f"{m['os']}; Python {m['python']}, torch {m['torch']}, flwr {m['flwr']}",
        "- other jobs shared the machine during the run when the load average (below, per "
        "benchmark) exceeds the core count; timings are then pessimistic.",
        "",
        "## Headline",
        "",
        md_table(["figure", "value", "split of the value", "selected on", "target"],
                 [[k, scalar(head.get(k)), _field(head.get(k), "split"),
                   _field(head.get(k), "selected_on") + (" (see the note)" if isinstance(
                       head.get(k), dict) and "rule_note" in head[k] else ""),
                   _status(k, head.get(k))] for k in TARGETS]),
    ]
    notes = [f"- {k}: {head[k]['rule_note']}" for k in TARGETS
             if isinstance(head.get(k), dict) and "rule_note" in head[k]]
    if notes:
        lines += ["", "Notes on how a rule came about:", "", *notes]
    for name, title in TITLES.items():
        res = results.get(name)
        lines += ["", f"## {title}", ""]
        if res is None:
            lines.append("Not run.")
            continue
        load = res.get("machine", {}).get("load_average_1_5_15")
        cpu = res.get("machine", {}).get("cpu", "unknown CPU")
        lines.append(f"Run {res['started']} ({'quick' if res['quick'] else 'full'}) on {cpu}, "
                     f"{res['wall_s']:.0f} s, load average at start {load}, at end "
                     f"{res.get('load_average_at_end')}.")
        lines.append("")
        if "error" in res:
            lines.append(f"FAILED: `{res['error']}`")
            continue
        if fail := res.get("last_failure"):
            lines += [f"**The latest run ({fail.get('started')}) FAILED:** `{fail['error']}`. "
                      "The figures below are the stored ones of the run above.", ""]
        module = importlib.import_module(f"benchmarks.{name}")
        lines += [module.markdown(res), "", NOTES[name]]
        extra = getattr(module, "EXTRA_NOTES", "")
        if extra:
            lines += ["", extra]
    lines += ["", "## 9. GPU check", "", gpu_section(gpu or head.get("gpu_check"))]
    return "\n".join(lines) + "\n"


def gpu_section(record: Any) -> str:
    """`benchmarks/gpu_check.sh` as recorded on a GPU machine, or why it was not run."""
    if not isinstance(record, dict):
        return (f"{str(record).capitalize()}: this session's machine had no NVIDIA GPU. "
                "`bash benchmarks/gpu_check.sh` (CUDA torch) runs a short BreastMNIST "
                "federation on CUDA (pretrain, simulate with a GPU share per ClientApp, "
                "predict), prints device, throughput and AUC, fails unless every hospital's "
                "trained tensors were on the GPU, and writes `benchmarks/results/gpu_check.json`"
                ", which this section then shows. Its CPU dry run "
                "(`python -m benchmarks.gpu_check --dry-run-on-cpu`) is what was checked here.")
    intro = ("`bash benchmarks/gpu_check.sh --headline` on a machine with an NVIDIA GPU: "
             "local training throughput on CUDA and on one CPU thread; `medfed pretrain`, "
             "`medfed simulate` (5 BreastMNIST hospitals on Flower's simulation runtime, a GPU "
             "share per ClientApp) and `medfed predict` with `--device cuda`, the script failing "
             "unless every hospital's trained tensors were on the GPU; first a short check "
             "(1 pretraining epoch, a few rounds), then configs/breast.yaml as it stands "
             "(`headline_*`). AUC: the server's check over the hospitals' validation splits "
             "(chooses the version kept) and all hospitals' test rows (reported only). "
             "Wall times include Ray's start.")
    record = dict(record)
    if isinstance(record.get("machine"), dict):
        m = record.pop("machine")
        record["machine"] = (f"{m.get('cpu')}, {m.get('logical_cores')} logical cores, "
                             f"{m.get('memory_gb')} GB, Python {m.get('python')}, flwr "
                             f"{m.get('flwr')}, load average {m.get('load_average_1_5_15')}")
    return intro + "\n\n" + md_table(
        ["figure", "value"], [[k, v if isinstance(v, str) else fmt(v)
                               if not isinstance(v, list) else ", ".join(v)]
                              for k, v in record.items()])
