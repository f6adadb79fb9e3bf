"""The training loop behind ``train.py``: data, state, checkpoints, evaluation and logging."""

import contextlib
import math
import signal
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from megacontext_jax import data, sharding, variants
from megacontext_jax.checkpoint import Checkpointer, write_config
from megacontext_jax.config import validate
from megacontext_jax.metrics import MetricsWriter, plot_loss_curve
from megacontext_jax.model import count_params
from megacontext_jax.restore import attach_base
from megacontext_jax.tokenizer import tokenizer_for
from megacontext_jax.train_step import (
    checkpointed,
    frozen_base,
    make_eval_step,
    make_train_step,
    make_trainable,
)


def _local_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    start = jax.process_index() * rows
    return {k: v[start : start + rows] for k, v in batch.items()}


def mc_batch(
    batch: dict[str, np.ndarray], step: int, config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
    """Adds the tokens and the host-built working contexts of a MegaContext training step.

    The contexts' randomness derives from (seed, step, process), so a resumed run repeats it.
    """
    layout = variants.Layout.from_config(config)
    rows, seq_len = batch["inputs"].shape
    rng = np.random.default_rng([config.seed, step, jax.process_index()])
    contexts, expand_lod, from_pyramid = variants.training_contexts(
        rows,
        config.mc.num_random_variants,
        seq_len - layout.scored,
        layout,
        rng,
        config.mc.deep_fraction,
    )
    tokens = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    out = {
        **batch,
        **contexts,
        "tokens": tokens,
        "expand_lod": expand_lod,
        "from_pyramid": from_pyramid,
    }
    if config.mc.loss.span_kl > 0:
        spans = variants.span_layout(
            rows,
            seq_len,
            tuple(config.mc.span_kl.fractions),
            layout.block_size,
            config.mc.span_kl.horizon,
            rng,
        )
        out.update({f"span_{name}": value for name, value in spans.items()})
    return out


@contextlib.contextmanager
def _stop_requests():
    """SIGINT and SIGTERM (a scheduler's preemption notice) ask the loop to stop between steps,
    where the state and the data iterator agree; a second SIGINT interrupts at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach main only
        yield requested
        return

    def handler(signum, frame):
        if requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def evaluate(eval_step, params, batches, mesh, rows: int, per_token: float) -> dict[str, float]:
    """Validation loss (nats per token) and bits per byte (``per_token``: bytes per token) over
    fixed batches."""
    nll, count = 0.0, 0
    for batch in batches:
        s, n = eval_step(params, sharding.global_batch(_local_rows(batch, rows), mesh))
        nll, count = nll + float(s), count + int(n)
    loss = nll / max(count, 1)
    return {"val/loss": loss, "val/bpb": loss / math.log(2) / per_token}


def train(
    config: ml_collections.ConfigDict, *, stop_at: int | None = None, progress: bool = True
) -> dict[str, float]:
    """Trains (or resumes) the run in ``config.workdir``; returns the final metrics.

    ``stop_at`` ends this invocation after that step with a checkpoint, as an interruption would;
    running again with the same workdir resumes exactly where it stopped.
    """
    workdir = Path(config.workdir)
    if config.model.family == "llama":
        from megacontext_jax.llama import sync_config

        sync_config(config)
        validate(config)  # the checkpoint's sizes against the MegaContext settings
    write_config(workdir, config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    global_bs = config.train.batch_size
    curriculum = config.curriculum.steps
    sizes = {"train.batch_size": global_bs}
    if curriculum:
        sizes["curriculum.batch_size"] = config.curriculum.batch_size
    for field, size in sizes.items():
        if size % mesh.size or size % jax.process_count():
            raise ValueError(
                f"config.{field}={size} must be divisible by the {mesh.size} devices "
                f"and {jax.process_count()} processes"
            )
    rows = global_bs // jax.process_count()
    seq_len = config.data.seq_len

    tokenizer = tokenizer_for(config.model)
    docs = data.tokenize(
        data.load_documents(config.data.source, config.data.jsonl_field), tokenizer
    )
    train_docs, val_docs = data.split_documents(docs, config.data.val_fraction)

    def stage_batches(after_step: int):
        """The training iterator of the step after ``after_step`` (the curriculum's or the main
        one); its state is what a checkpoint at ``after_step`` records."""
        cur = config.curriculum
        in_curriculum = after_step < curriculum
        dataset = data.train_dataset(
            train_docs,
            cur.seq_len if in_curriculum else seq_len,
            cur.batch_size // jax.process_count() if in_curriculum else rows,
            config.seed,
            jax.process_index(),
            jax.process_count(),
            config.data.passkey_fraction,
            tokenizer,
            config.data.repeat_fraction,
        )
        return iter(dataset)

    checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    data_iter = stage_batches(checkpointer.latest_step() or 0)
    val_batches = data.validation_batches(
        val_docs, seq_len, global_bs, config.train.eval_batches, tokenizer
    )
    token_bytes = tokenizer.token_bytes()
    unigram_bpb = data.unigram_bits_per_byte(train_docs, val_batches, token_bytes)
    per_token = data.bytes_per_token(val_batches, token_bytes)

    trainable = make_trainable(config, mesh)
    if checkpointer.latest_step() is not None:
        abstract = checkpointed(trainable.abstract_state(), config)
        state, start = checkpointer.restore(abstract, data_iter)
        tqdm.write(f"resumed {workdir} from step {start}")
    else:
        state, start = trainable.init(), 0
    if frozen_base(config):
        state = attach_base(state, trainable, config)
    train_step, eval_step = make_train_step(trainable), make_eval_step(trainable)
    base_step = make_train_step(trainable, base_only=True) if curriculum else None
    writer = MetricsWriter(workdir)
    if start == 0:
        writer.write(0, {"params": count_params(state.params), "val/unigram_bpb": unigram_bpb})

    end = config.train.steps if stop_at is None else min(stop_at, config.train.steps)

    def tokens_per_step(step: int) -> int:
        if step <= curriculum:
            return config.curriculum.batch_size * config.curriculum.seq_len
        return global_bs * seq_len

    bar = tqdm(
        total=config.train.steps,
        initial=start,
        disable=not progress or jax.process_index() != 0,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    summary: dict[str, float] = {"val/unigram_bpb": unigram_bpb}
    pending, last_time, last_step = [], time.perf_counter(), start
    step = start
    with _stop_requests() as stop:
        try:
            for step in range(start + 1, end + 1):
                if stop.is_set():
                    raise KeyboardInterrupt
                batch = next(data_iter)
                in_curriculum = step <= curriculum
                if config.mc.enabled and not in_curriculum:
                    batch = mc_batch(batch, step, config)
                batch = sharding.global_batch(batch, mesh)
                state, metrics = (base_step if in_curriculum else train_step)(state, batch)
                pending.append(metrics)
                if step == curriculum:
                    data_iter = stage_batches(step)
                    bar.write(
                        f"step {step}: curriculum done, training on {seq_len}-token sequences"
                    )
                # The curriculum's last step is logged on its own: its metrics have other keys.
                if step % config.train.log_every == 0 or step in (end, curriculum):
                    fetched = jax.device_get(pending)
                    now = time.perf_counter()
                    # The first interval includes compilation; tokens/s counts from the second one.
                    rate = (step - last_step) * tokens_per_step(step) / (now - last_time)
                    record = {
                        f"train/{key}": float(np.nanmean([m[key] for m in fetched]))
                        for key in fetched[0]
                        if key != "lr" and not np.isnan([m[key] for m in fetched]).all()
                    }
                    record["train/lr"] = float(fetched[-1]["lr"])
                    if last_step not in (start, curriculum):  # intervals that compiled a step
                        record["train/tokens_per_s"] = rate
                    writer.write(step, record)
                    summary.update(record)
                    bar.set_postfix(
                        loss=f"{record['train/loss']:.3f}", tok_s=f"{rate:,.0f}", refresh=False
                    )
                    bar.update(step - last_step)
                    pending, last_time, last_step = [], time.perf_counter(), step
                if step % config.train.eval_every == 0 or step == config.train.steps:
                    val = evaluate(eval_step, state.params, val_batches, mesh, rows, per_token)
                    writer.write(step, val)
                    summary.update(val)
                    bar.write(
                        f"step {step}: val loss {val['val/loss']:.4f}, bpb {val['val/bpb']:.4f} "
                        f"(unigram {unigram_bpb:.4f})"
                    )
                    last_time = time.perf_counter()
                if step % config.train.checkpoint_every == 0 or step in (end, curriculum):
                    checkpointer.save(step, checkpointed(state, config), data_iter)
        except KeyboardInterrupt:
            # A second SIGINT can land while a step holds the donated state: nothing to save then.
            leaves = jax.tree.leaves(state)
            deleted = any(isinstance(x, jax.Array) and x.is_deleted() for x in leaves)
            done = None if deleted else int(state.step)
            if done is not None and checkpointer.latest_step() != done:
                bar.write(f"interrupted: saving a checkpoint at step {done}")
                checkpointer.save(done, checkpointed(state, config), data_iter)
            raise
        finally:
            bar.close()
            checkpointer.wait()
            checkpointer.close()
            writer.close()
    if writer.enabled and writer.path.exists():
        plot_loss_curve(writer.path, workdir / "loss.png")
    summary["step"] = step
    return summary
