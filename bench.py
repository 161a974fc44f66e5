"""Speed benchmarks. They print figures; nothing here is a test.

    python bench.py encoder     # training steps of bert.py's encoder vs transformers.BertModel
    python bench.py compile     # training steps of the default recipe with and without --compile
    python bench.py steps FLAGS # training steps of the default recipe vs the default with FLAGS
    python bench.py techniques  # SMART's and Sophia's mechanisms on MiniLM and real batches
    python bench.py peak        # the machine's matmul peak and the encoder's training step as a share of it
    python bench.py evaluation  # dev-set prediction speed by eval batch size and precision
    python bench.py save        # how long saving last.pt takes for a bert-base-sized run (after a signal)

`encoder`: forward + backward steps of the from-scratch encoder (bert.py) against
transformers.BertModel (attn_implementation="sdpa") holding the same embedded all-MiniLM-L6-v2
weights, on the same random batches. Both run in train mode with their default dropout and the same
loss. The two models alternate in one process (warm-up, then rounds of A/B, the order flipped each
round) so that load from other processes on a shared machine hits both alike; the table gives
medians over rounds and the ratio ours / transformers (> 1: ours is faster).

`compile`: the training loop's own steps (multitask_classifier.train_step on the real training data,
tasks in turn) for two copies of the default model, one with the encoder compiled as `--compile` does
it. Both draw the same batches. It reports the compile cost (the compiled copy's first steps, which
compile the forward and backward graphs for dynamic lengths, minus the eager copy's time for the
same steps), checks that the two copies' eval-mode logits agree, then alternates rounds of steps and
gives the median ratio compiled / eager (> 1: compiling is faster). Needs a C++ compiler (inductor).

`steps FLAGS`: the same step loop for the default recipe and for the default with FLAGS (e.g.
`"--freeze_layers 2"`), same batches, alternating rounds; gives both throughputs and the ratio
variant / default (> 1: the variant's steps are faster); `--base=FLAGS` (with `=`: FLAGS start with
`--`) times the variant against the default with those flags instead. Steps run as the loop runs them
(`multitask_classifier.advance`), so every --log_every-th step computes the technique diagnostics:
`steps "--smart --log_every 100000" --base=--smart` gives their cost. Speed only: what the variant does to accuracy needs a training run.

`techniques`: what SMART and Sophia do at the defaults, on the embedded MiniLM in train mode and real
training batches: SMART's term with no perturbation (0: same dropout masks, same precision), at the
adversarial perturbation and at random perturbations of the same per-token norms, and its encoder
gradient relative to the task loss's, per task, in fp32 and bf16; then the fraction of coordinates
Sophia leaves unclipped after some steps of the default schedule (`--rhos` to compare values).

`peak`: the machine's matmul throughput per dtype (the best of a square 2048 product and the encoder's
own feed-forward shapes), then the encoder's training step (forward + backward, batch 32, every
position of the padded batch counted) in FLOP/s and as a share of that peak. A step's FLOPs: 6 x
non-embedding parameters per token (2 forward, 4 backward) plus attention's two batched products
(scores and weighted values: 4 B T^2 H per layer forward, 12 with backward). `--profile` adds the
top operators of one profiled step per dtype: where the rest of the time goes.

`evaluation`: how fast the dev sets are predicted (the loop's own `run_evaluation`: eval mode, no
autograd, longest batches first) for each `--batch-sizes` and each precision (fp32, and bf16 where the
CPU has it natively), on `--max-dev-examples` rows per task of the real dev files; rows/s and tokens/s.

transformers is a benchmark-only dependency of `encoder`: ./setup.sh --dev installs it.
"""
import argparse
import contextlib
import json
import os
import shlex
import statistics
import time

import torch

from bert import BertModel
from datasets import epoch_task_schedule
from flags import parse_args
from hardware import native_bf16, resolve_amp
from model import apply_trainable, build_model, compile_encoder, output_kind, shared_parameters, task_loss
from optimizer import hutchinson_hessian
from pipeline import load_datasets, to_device
from predict import run_evaluation
from pretrained import BertConfig, embedded_model_dir
from smart import smart_adversarial_loss, smart_divergence, smart_perturbation
from state import Run
from techniques import gradient_norm, perturbed_logits_fn
from tokenizer import BertTokenizer
import train
from train import advance, set_learning_rate

WARMUP_EXAMPLES = 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench.py needs transformers (benchmark-only): run ./setup.sh --dev") from None
    return transformers


def random_batch(batch_size: int, seq_len: int, vocab_size: int, device: str) -> dict[str, torch.Tensor]:
    """Random token ids with per-example lengths uniform in [seq_len / 2, seq_len], padded to seq_len."""
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,))
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()  # (B, T)
    input_ids = torch.randint(1000, vocab_size, (batch_size, seq_len)) * attention_mask  # pads are id 0
    token_type_ids = torch.zeros_like(input_ids)
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=attention_mask,
                                              token_type_ids=token_type_ids).items()}


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: torch.autocast):
    """One training step without the optimizer: forward, a loss on both outputs, backward, zero grads."""
    with autocast:
        out = model(**batch)
    loss = out["pooler_output"].float().pow(2).mean() + out["last_hidden_state"].float().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def time_steps(model, batch, autocast, steps: int, device: str) -> float:
    """Seconds for `steps` training steps."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, batch, autocast)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def load_both(device: str, model_dir: str):
    """bert.py's encoder and transformers.BertModel, both from `model_dir`; checks they agree."""
    transformers = import_transformers()
    ours = BertModel.from_pretrained(model_dir)
    theirs = transformers.BertModel.from_pretrained(model_dir, attn_implementation="sdpa")
    ours.to(device).eval()
    theirs.to(device).eval()
    batch = random_batch(4, 32, ours.config.vocab_size, device)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        a, b = ours(**batch), theirs(**batch)
    # Padded positions are excluded: what a model writes there is arbitrary.
    torch.testing.assert_close(a["last_hidden_state"][keep], b.last_hidden_state[keep], atol=1e-4, rtol=0)
    torch.testing.assert_close(a["pooler_output"], b.pooler_output, atol=1e-4, rtol=0)
    return ours.train(), theirs.train(), transformers.__version__


def bench_encoder(args):
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device == "cpu" and "fp16" in args.dtypes:
        raise SystemExit("--dtypes fp16 needs --device cuda (CPU autocast here uses bf16)")
    torch.set_num_threads(args.threads)
    if args.shape == "bert-base":  # bert-base's shape, random weights (the same in both models)
        import tempfile
        folder = tempfile.mkdtemp()
        write_random_bert(folder, 12, 768, 12, 3072)
    torch.manual_seed(0)
    ours, theirs, hf_version = load_both(device, embedded_model_dir() if args.shape == "minilm" else folder)
    models = {"ours": ours, "transformers": theirs}
    name = "all-MiniLM-L6-v2" if args.shape == "minilm" else "bert-base shape (12 x 768, random weights)"
    rows = []

    print(f"encoder train step (forward + backward), {name}, batch {args.batch_size}, device {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {hf_version} "
          f"(attn_implementation=sdpa); eval outputs agree to 1e-4")
    cfg = ours.config
    print(f"both in train mode with the checkpoint's dropout: {cfg.hidden_dropout_prob} hidden, "
          f"{cfg.attention_probs_dropout_prob} attention (on CPU ours draws the masks from 16-bit random draws: bert.FastDropout)")
    print(f"tokens/s counts every position of the padded batch; median over alternating rounds "
          f"(up to {args.rounds}, fewer once a cell has taken {args.cell_seconds:.0f} s; steps = per model per round)")
    print(f"{'seq':>5} {'dtype':>5} {'rounds':>6} {'steps':>5} {'tok/s ours':>11} {'tok/s transformers':>19} {'ratio':>6}"
          + (f" {'peak MiB ours':>13} {'transformers':>12}" if device == "cuda" else ""), flush=True)
    for seq_len in args.seq_lens:
        batch = random_batch(args.batch_size, seq_len, ours.config.vocab_size, device)
        # Warm-up (lazy initialisation, kernel selection for this dtype and length) on a few examples:
        # a full-size warm-up would double the cost of the slow cells (bf16 without native bf16).
        small = {k: v[:WARMUP_EXAMPLES] for k, v in batch.items()}
        tokens = batch["input_ids"].numel()
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
            for model in models.values():
                time_steps(model, small, autocast, 1, device)
            rates, peaks = {name: [] for name in models}, {}
            steps, spent = args.steps or 1, 0.0
            for r in range(args.rounds):
                order = list(models) if r % 2 == 0 else list(reversed(models))
                for name in order:
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    seconds = time_steps(models[name], batch, autocast, steps, device)
                    rates[name].append(steps * tokens / seconds)
                    spent += seconds
                    if device == "cuda":
                        peaks[name] = torch.cuda.max_memory_allocated() / 2 ** 20
                if args.steps is None and r == 0:  # size later rounds from the first one
                    steps = max(1, min(args.max_steps, round(args.round_seconds * steps * 2 / spent)))
                if spent > args.cell_seconds:
                    break
            ours_rate, theirs_rate = (statistics.median(rates[name]) for name in models)
            print(f"{seq_len:>5} {dtype_name:>5} {len(rates['ours']):>6} {steps:>5} {ours_rate:>11.0f} "
                  f"{theirs_rate:>19.0f} {ours_rate / theirs_rate:>6.2f}"
                  + (f" {peaks['ours']:>13.0f} {peaks['transformers']:>12.0f}" if peaks else ""), flush=True)
            rows.append({"seq_len": seq_len, "dtype": dtype_name, "tokens_per_s": ours_rate,
                         "transformers_tokens_per_s": theirs_rate, "ratio": ours_rate / theirs_rate,
                         "peak_mib": peaks.get("ours"), "transformers_peak_mib": peaks.get("transformers")})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "device": device, "batch_size": args.batch_size, "torch": torch.__version__,
                       "transformers": hf_version, "rows": rows}, f, indent=2)


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: str, seconds: float) -> float:
    """GFLOP/s of (m, k) @ (k, n) products repeated for about `seconds` (after two untimed ones)."""
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
        if device == "cuda" and count % 10 == 0:
            torch.cuda.synchronize()
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def training_step_flops(model: BertModel, batch_size: int, seq_len: int) -> float:
    """FLOPs of one forward + backward step: 6 x non-embedding parameters per token, plus attention's
    QK^T and AV products (2 x 2 B T^2 H forward per layer, x3 with backward)."""
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embeddings."))
    cfg = model.config
    tokens = batch_size * seq_len
    attention = 12 * batch_size * seq_len ** 2 * cfg.hidden_size * cfg.num_hidden_layers
    return 6 * non_embedding * tokens + attention


def bench_peak(args):
    device = args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BertModel.from_pretrained(embedded_model_dir()).to(device).train()
    cfg = model.config
    tokens = args.batch_size * args.seq_len
    shapes = [(2048, 2048, 2048), (tokens, cfg.hidden_size, cfg.intermediate_size),
              (tokens, cfg.intermediate_size, cfg.hidden_size)]
    flops = training_step_flops(model, args.batch_size, args.seq_len)
    print(f"matmul peak and the encoder's training step, all-MiniLM-L6-v2, batch {args.batch_size} x seq "
          f"{args.seq_len} (every position counted), device {device}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; a step is {flops / 1e9:.1f} GFLOP")
    print(f"{'dtype':>5} " + " ".join(f"{f'{m}x{k}@{k}x{n}':>21}" for m, k, n in shapes)
          + f" {'peak GFLOP/s':>12} {'step s':>7} {'step GFLOP/s':>12} {'share of peak':>13}", flush=True)
    batch = random_batch(args.batch_size, args.seq_len, cfg.vocab_size, device)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # the FLOP count assumes no padding
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        rates = [matmul_gflops(m, k, n, dtype, device, args.matmul_seconds) for m, k, n in shapes]
        autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
        time_steps(model, batch, autocast, 2, device)  # warm-up
        step_s = statistics.median(time_steps(model, batch, autocast, 1, device) for _ in range(args.steps))
        achieved = flops / step_s / 1e9
        print(f"{dtype_name:>5} " + " ".join(f"{r:>21.0f}" for r in rates)
              + f" {max(rates):>12.0f} {step_s:>7.3f} {achieved:>12.0f} {achieved / max(rates):>13.1%}", flush=True)
        if args.profile:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
            with torch.profiler.profile(activities=activities) as profiler:
                time_steps(model, batch, autocast, 1, device)
            sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.profile), flush=True)


def write_random_bert(folder: str, layers: int, hidden: int, heads: int, intermediate: int) -> str:
    """A HuggingFace-format BERT folder with random weights of the given shape and MiniLM's vocabulary
    (bert-base-uncased's 30522 word-pieces): nothing is downloaded."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    shape = dict(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 intermediate_size=intermediate, max_position_embeddings=512, type_vocab_size=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**shape, "model_type": "bert"}, f)
    with open(os.path.join(embedded_model_dir(), "vocab.txt")) as f:
        vocab = f.read()
    with open(os.path.join(folder, "vocab.txt"), "w") as out:
        out.write(vocab)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in BertModel(BertConfig(**shape)).state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    return folder


def bench_save(args):
    """The time a run takes to write last.pt after a signal (`Run.save`: the state gathered, then written
    through a temporary file, fsync'd and renamed), for bert-base's shape (12 x 768, random weights) with
    AdamW's moments after one step, to a folder on the disk that will hold the runs (--dir). torchrun kills
    its workers about 30 s after forwarding SIGTERM: the step under way, the save and the exit must fit."""
    import tempfile
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        bert = write_random_bert(os.path.join(folder, "bert-base-shape"), 12, 768, 12, 3072)
        cfg = parse_args(["--data_dir", args.data_dir, "--bert_path", bert, "--max_train_examples", "8",
                          "--max_dev_examples", "8", "--batch_size", "2", "--amp", "none"])
        data = load_datasets(cfg, BertTokenizer.from_pretrained(bert), splits=("train",))
        model = build_model(cfg)
        apply_trainable(model, cfg, epoch=0)
        run = Run(cfg, model, data, torch.device("cpu"), "none")
        advance(run, "sst")  # AdamW's two moments exist from the first step on
        path = os.path.join(folder, "last.pt")
        seconds = sorted(_timed(lambda: run.save(path)) for _ in range(args.repeats))
        size = os.path.getsize(path) / 2 ** 30
    figures = {"gib": size, "median_seconds": seconds[len(seconds) // 2], "slowest_seconds": seconds[-1]}
    print(f"bench save: bert-base shape ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, "
          f"AdamW), last.pt {size:.2f} GiB in {args.dir or tempfile.gettempdir()}: "
          f"median {seconds[len(seconds) // 2]:.1f} s, slowest {seconds[-1]:.1f} s of {args.repeats} "
          f"(torchrun's grace after SIGTERM: about 30 s)", flush=True)
    return figures


def bench_evaluation(args):
    torch.set_num_threads(args.threads)
    cfg = parse_args(["--data_dir", args.data_dir, "--max_dev_examples", str(args.max_dev_examples)])
    dev = load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))["dev"]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    cpu = torch.device("cpu")
    precisions = ["none"] + (["bf16"] if native_bf16(cpu) else [])
    rows, tokens = sum(len(ds) for ds in dev.values()), sum(sum(ds.lengths) for ds in dev.values())
    print(f"dev prediction, {', '.join(f'{t} {len(ds)}' for t, ds in dev.items())} rows ({tokens} tokens), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; best of {args.repeats}")
    print(f"{'amp':>5} {'batch':>6} {'seconds':>8} {'rows/s':>7} {'tokens/s':>9}", flush=True)
    for amp in precisions:
        context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp == "bf16" else contextlib.nullcontext
        for batch_size in args.batch_sizes:
            run_evaluation(model, {t: ds for t, ds in dev.items() if t == "sst"}, cpu, context, batch_size)  # warm-up
            seconds = min(_timed(lambda: run_evaluation(model, dev, cpu, context, batch_size))
                          for _ in range(args.repeats))
            print(f"{amp:>5} {batch_size:>6} {seconds:>8.1f} {rows / seconds:>7.0f} {tokens / seconds:>9.0f}", flush=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def recipe_runs(args, variants: dict[str, list[str]]) -> dict:
    """One multitask_classifier.Run per variant (extra flags on top of the defaults), on the real
    training data, each model built from the same seed."""
    torch.set_num_threads(args.threads)
    runs = {}
    for name, flags in variants.items():
        cfg = parse_args(["--data_dir", args.data_dir, "--max_dev_examples", "64", *flags])
        if not runs:
            data = load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        apply_trainable(model, cfg, epoch=0)
        if cfg.compile:
            compile_encoder(model)
        runs[name] = Run(cfg, model, data, torch.device("cpu"), resolve_amp(args.amp, torch.device("cpu")))
    return runs


def run_steps(run, n: int) -> tuple[float, int]:
    """(seconds, tokens) for n training steps of `run`, tasks in turn."""
    tasks, tokens = list(run.sizes), 0
    run.model.train()
    start = time.perf_counter()
    for _ in range(n):  # the loop's own step: logged steps (--log_every) compute the diagnostics
        tokens += advance(run, tasks[run.step % len(tasks)])[1]
        run.diagnostics.end_step()
    return time.perf_counter() - start, tokens


def alternate(runs: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median tokens/s of each run over `rounds` rounds of `steps` steps, the order flipped each round."""
    rates = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            seconds, tokens = run_steps(runs[name], steps)
            rates[name].append(tokens / seconds)
    return {name: statistics.median(rate) for name, rate in rates.items()}


def bench_compile(args):
    runs = recipe_runs(args, {"eager": [], "compiled": ["--compile"]})
    cfg, data, device = runs["eager"].cfg, runs["eager"].data, torch.device("cpu")
    print(f"training steps of the default recipe (MiniLM, batch {cfg.batch_size}, amp {runs['eager'].amp}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}), eager vs --compile "
          f"(torch.compile(dynamic=True) of the encoder)",
          flush=True)
    eager_first, _ = run_steps(runs["eager"], args.warmup_steps)
    compiled_first, _ = run_steps(runs["compiled"], args.warmup_steps)
    print(f"first {args.warmup_steps} steps: eager {eager_first:.1f} s, compiled {compiled_first:.1f} s "
          f"(compile cost about {compiled_first - eager_first:.0f} s)", flush=True)
    # Same weights after the same steps and batches (dropout masks differ): eval-mode logits agree.
    runs["compiled"].model.load_state_dict(runs["eager"].model.state_dict())
    largest = 0.0
    for task in runs["eager"].sizes:
        batch = to_device(data["dev"][task].collate(list(range(16))), device)
        outputs = []
        for run in runs.values():
            run.model.eval()
            with torch.no_grad():
                outputs.append(run.model.logits(task, batch))
        largest = max(largest, (outputs[0] - outputs[1]).abs().max().item())
    print(f"eval-mode logits, same weights: largest difference {largest:.1e}", flush=True)
    if largest > 1e-3:
        raise SystemExit("compiled and eager models disagree")
    rates = alternate(runs, args.rounds, args.steps)
    print(f"steady state, {args.rounds} alternating rounds of {args.steps} steps: eager {rates['eager']:.0f} tok/s, "
          f"compiled {rates['compiled']:.0f} tok/s, ratio {rates['compiled'] / rates['eager']:.2f}", flush=True)


def bench_steps(args):
    runs = recipe_runs(args, {"default": shlex.split(args.base), "variant": shlex.split(args.flags)})
    cfg = runs["default"].cfg
    base = f"the default with {args.base}" if args.base else "the default recipe"
    print(f"training steps (MiniLM, batch {cfg.batch_size}, amp {runs['default'].amp}, {torch.get_num_threads()} "
          f"threads, torch "
          f"{torch.__version__}): {base} vs the default with {args.flags}", flush=True)
    for run in runs.values():  # warm-up
        run_steps(run, args.warmup_steps)
    rates = alternate(runs, args.rounds, args.steps)
    print(f"{args.rounds} alternating rounds of {args.steps} steps: {args.base or 'default'} {rates['default']:.0f} "
          f"tok/s, {args.flags} {rates['variant']:.0f} tok/s, ratio {rates['variant'] / rates['default']:.2f}",
          flush=True)


def bench_techniques(args):
    """SMART's and Sophia's mechanisms on the embedded MiniLM and real batches, at the defaults."""
    torch.set_num_threads(args.threads)

    def real_run(*flags):
        cfg = parse_args(["--data_dir", args.data_dir, "--max_train_examples", str(args.batch_size * 4),
                          "--max_dev_examples", "8", "--batch_size", str(args.batch_size), *flags])
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        apply_trainable(model, cfg, epoch=0)
        run = Run(cfg, model, load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path)),
                     torch.device("cpu"), "none")
        run.model.train()
        return run

    run = real_run("--smart")
    cfg = run.cfg
    setting = dict(eps=cfg.smart_eps, step_size=cfg.smart_step_size, noise_var=cfg.smart_noise_var,
                   steps=cfg.smart_steps, norm=cfg.smart_norm)
    print(f"SMART at the defaults ({', '.join(f'{k} {v}' for k, v in setting.items())}, weight {cfg.smart_weight}), "
          f"MiniLM in train mode (dropout on), fresh heads, the first {args.batch_size} training rows of each task, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| task | amp | term at delta=0 | adversarial term | random, same per-token norms | ratio | "
          "encoder grad: term / task loss |\n|---|---|---|---|---|---|---|")
    for task in run.sizes:
        kind = output_kind(run.model.specs[task], cfg.sst_loss)
        batch = run.train_sets[task].collate(list(range(args.batch_size)))
        for amp in ("none", "bf16"):
            run.amp = amp
            with run.amp_context():
                clean = run.clean_forward(task, batch)
                logits_fn = perturbed_logits_fn(run.model, task, clean)
                x = clean.embeddings.detach()
                zero = smart_divergence(logits_fn(x), clean.logits, kind).item()
                delta = smart_perturbation(logits_fn, clean.embeddings, clean.logits, kind, clean.mask,
                                           generator=torch.Generator().manual_seed(0), **setting)
                term = smart_adversarial_loss(logits_fn, clean.embeddings, clean.logits, kind, clean.mask,
                                              generator=torch.Generator().manual_seed(0), **setting)
                generator, random = torch.Generator().manual_seed(1), []
                for _ in range(5):
                    direction = torch.randn(delta.shape, generator=generator) * clean.mask.unsqueeze(-1)
                    scaled = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-30) \
                        * delta.float().norm(dim=-1, keepdim=True)
                    random.append(smart_divergence(logits_fn(x + scaled.to(x.dtype)), clean.logits, kind).item())
                loss = task_loss(run.model.specs[task], clean.logits, batch["labels"])
            encoder = shared_parameters(run.model)
            norms = [float(gradient_norm(torch.autograd.grad(out, encoder, retain_graph=True, allow_unused=True)))
                     for out in (cfg.smart_weight * term, loss)]
            mean_random = sum(random) / len(random)
            print(f"| {task} | {amp} | {zero:.1e} | {term.item():.3g} | {mean_random:.3g} | "
                  f"{term.item() / mean_random:.0f}x | {norms[0] / norms[1]:.3f} |", flush=True)
    tokens = clean.embeddings.float()[clean.mask.bool()]  # the last batch's real tokens, (tokens, hidden)
    print(f"embedding-layer output (sts batch): mean |coordinate| {tokens.abs().mean():.3f}, token l2 norm "
          f"{tokens.norm(dim=-1).mean():.2f}, token max-abs {tokens.abs().amax(-1).mean():.2f}\n")

    print(f"Sophia: fraction of coordinates not clipped (|m| < max(rho h, eps)) after {args.sophia_steps} steps "
          f"of the default schedule, Hessian refreshed every {args.hess_interval} steps")
    print("| optimizer | rho | unclipped | Hessian mean |\n|---|---|---|---|")
    for optimizer in ("sophiag", "sophiah"):
        for rho in args.rhos or [None]:
            run = real_run("--optimizer", optimizer, "--hess_interval", str(args.hess_interval),
                           *(["--rho", str(rho)] if rho is not None else []))
            schedule = epoch_task_schedule(run.cfg.task_scheduler, run.sizes, args.sophia_steps,
                                              run.schedule_generator, 0, 1)
            for task in schedule:
                set_learning_rate(run, task)
                train.train_step(run, [task])
                run.step += 1
            unclipped, hessian_mean = run.optimizer.clip_statistics()
            print(f"| {optimizer} | {run.cfg.sophia_rho:g}{'' if rho is not None else ' (default)'} | "
                  f"{unclipped.item():.3f} | {hessian_mean.item():.3g} |", flush=True)

    # Sophia-H's estimator itself: how much of the encoder's diagonal it sees, in both precisions.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    run = real_run("--encoder_dropout", "0", "--hidden_dropout_prob", "0")
    encoder = [p for n, p in run.model.named_parameters() if n.startswith("bert.encoder.") and p.requires_grad]
    batch = run.train_sets["sst"].collate(list(range(args.batch_size)))
    estimates = {}
    for amp in ("none", "bf16"):
        run.amp, total = amp, None
        for probe in range(4):
            with sdpa_kernel(SDPBackend.MATH), run.amp_context():
                loss = task_loss(run.model.specs["sst"], run.model.logits("sst", batch), batch["labels"])
            _, h = hutchinson_hessian(loss, encoder, torch.Generator().manual_seed(probe))
            flat = torch.cat([t.flatten() for t in h])
            total = flat if total is None else total + flat
        estimates[amp] = total / 4
    agreement = torch.corrcoef(torch.stack(list(estimates.values())))[0, 1].item()
    print("\nHutchinson's diagonal estimate of the encoder (SST batch, dropout off, 4 probes averaged): "
          + "; ".join(f"{amp}: {(h > 0).float().mean().item():.3f} of coordinates positive, mean {h.mean().item():.2e}"
                      for amp, h in estimates.items())
          + f"; fp32 vs bf16 with the same probes r = {agreement:.5f}")


def comma_list(convert):
    def parse(text: str):
        return [convert(item) for item in text.split(",") if item.strip()]
    return parse


def add_step_loop_arguments(parser: argparse.ArgumentParser, warmup_steps: int, warmup_help: str, rounds: int):
    """Arguments of the subcommands that time the training loop's own steps (compile, steps)."""
    parser.add_argument("--data_dir", default="data", help="folder with the course CSV files")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (all cores)")
    parser.add_argument("--warmup-steps", type=int, default=warmup_steps, help=warmup_help)
    parser.add_argument("--rounds", type=int, default=rounds, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=15, help="steps per variant per round")
    parser.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                        help="autocast as multitask_classifier.py --amp (auto: bf16 where it is native)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    enc = commands.add_parser("encoder", help="train-step throughput: bert.py vs transformers.BertModel",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # --- what is measured
    enc.add_argument("--batch-size", type=int, default=32)
    enc.add_argument("--seq-lens", type=comma_list(int), default=[64, 128], help="comma-separated")
    enc.add_argument("--dtypes", type=comma_list(str), default=["fp32", "bf16"],
                     help="comma-separated: fp32 (no autocast), bf16, fp16 (autocast; fp16 on CUDA only)")
    enc.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    enc.add_argument("--shape", choices=("minilm", "bert-base"), default="minilm",
                     help="minilm: the embedded weights; bert-base: 12 x 768, random weights from a config")
    enc.add_argument("--json", default=None, help="also write the table's figures to this JSON file")
    enc.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (all cores)")
    # --- how long
    enc.add_argument("--rounds", type=int, default=5, help="most alternating A/B rounds per cell")
    enc.add_argument("--cell-seconds", type=float, default=40.0,
                     help="stop a cell's rounds once they have taken this long (at least one round runs); "
                          "keeps slow cells, e.g. bf16 on CPUs without native bf16, from dominating the run")
    enc.add_argument("--steps", type=int, default=None,
                     help="steps per model per round (default: 1 in the first round, then sized from it to "
                          "--round-seconds)")
    enc.add_argument("--round-seconds", type=float, default=2.0, help="target seconds per model per round")
    enc.add_argument("--max-steps", type=int, default=20, help="cap on the automatic steps per round")
    enc.set_defaults(run=bench_encoder)
    comp = commands.add_parser("compile", help="training steps of the default recipe with and without --compile",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_loop_arguments(comp, warmup_steps=12, warmup_help="first steps of each copy (compiles)", rounds=4)
    comp.set_defaults(run=bench_compile)
    steps = commands.add_parser("steps", help="training steps of the default recipe vs the default with FLAGS",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    steps.add_argument("flags", help="multitask_classifier.py flags of the variant, one string, e.g. "
                                     "'--freeze_layers 2'")
    steps.add_argument("--base", default="", help="flags of the reference instead of the bare default, given as "
                                                  "--base=FLAGS, e.g. --base=--smart to time "
                                                  "'--smart --log_every 100000' against it")
    add_step_loop_arguments(steps, warmup_steps=3, warmup_help="untimed first steps of each", rounds=6)
    steps.set_defaults(run=bench_steps)
    tech = commands.add_parser("techniques", help="SMART's and Sophia's mechanisms on MiniLM and real batches",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tech.add_argument("--data_dir", default="data", help="folder with the course CSV files")
    tech.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (all cores)")
    tech.add_argument("--batch-size", type=int, default=32)
    tech.add_argument("--sophia-steps", type=int, default=41, help="Sophia steps before the statistics")
    tech.add_argument("--hess-interval", type=int, default=10)
    tech.add_argument("--rhos", type=comma_list(float), default=None,
                      help="comma-separated rho values to compare (default: each estimator's default)")
    tech.set_defaults(run=bench_techniques)
    peak = commands.add_parser("peak", help="matmul peak per dtype and the encoder's training step as a share of it",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    peak.add_argument("--batch-size", type=int, default=32)
    peak.add_argument("--seq-len", type=int, default=128)
    peak.add_argument("--dtypes", type=comma_list(str), default=["fp32", "bf16"], help="comma-separated")
    peak.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    peak.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (all cores)")
    peak.add_argument("--matmul-seconds", type=float, default=2.0, help="time per matmul shape")
    peak.add_argument("--steps", type=int, default=5, help="timed training steps per dtype (median)")
    peak.add_argument("--profile", type=int, default=0, help="print this many top operators of one profiled step")
    peak.set_defaults(run=bench_peak)
    ev = commands.add_parser("evaluation", help="dev-set prediction speed by eval batch size and precision",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--data_dir", default="data", help="folder with the course CSV files")
    ev.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (all cores)")
    ev.add_argument("--max-dev-examples", type=int, default=1000, help="dev rows per task")
    ev.add_argument("--batch-sizes", type=comma_list(int), default=[64, 128, 256, 512], help="comma-separated")
    ev.add_argument("--repeats", type=int, default=2, help="timed passes per cell (the best is kept)")
    ev.set_defaults(run=bench_evaluation)
    save = commands.add_parser("save", help="seconds to write last.pt for a bert-base-sized run",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    save.add_argument("--dir", default=None, help="folder on the disk that will hold the runs (default: the "
                      "system's temporary folder)")
    save.add_argument("--repeats", type=int, default=3, help="saves timed")
    save.add_argument("--data_dir", default="data", help="folder with the course CSV files")
    save.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (all cores)")
    save.set_defaults(run=bench_save)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in ("encoder", "peak"):
        unknown = [d for d in args.dtypes if d not in DTYPES]
        if unknown:
            raise SystemExit(f"--dtypes: unknown {unknown}; known: {', '.join(DTYPES)}")
    return args.run(args)


if __name__ == "__main__":
    main()
