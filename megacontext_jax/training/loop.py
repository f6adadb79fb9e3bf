"""The training loop behind ``train.py``: data, state, checkpoints, evaluation and logging."""

import math
from functools import partial
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from megacontext_jax.config import config_diff, to_json, validate
from megacontext_jax.data import pipeline as data
from megacontext_jax.data.tokenizer import tokenizer_for
from megacontext_jax.nets.decoder import count_params
from megacontext_jax.specs import Layout
from megacontext_jax.training import sharding, shared_curriculum, variants
from megacontext_jax.training.checkpoint import Checkpointer, check_resume, write_config
from megacontext_jax.training.metrics import MetricsWriter, latest_metrics, plot_loss_curve
from megacontext_jax.training.progress import Phase, PhaseBar, startup_block
from megacontext_jax.training.restore import attach_base, check_base_chain
from megacontext_jax.training.step import (
    checkpointed,
    frozen_base,
    make_eval_step,
    make_train_step,
    make_trainable,
)
from megacontext_jax.training.stopping import Stop


def _local_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    start = jax.process_index() * rows
    return {k: v[start : start + rows] for k, v in batch.items()}


def mc_batch(
    batch: dict[str, np.ndarray], step: int, config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
    """Adds the tokens, each sequence's ``cursor`` (where its S scored tokens start: before the
    batch's ``stop`` where it has one, else at the end) and the host-built working contexts of
    a MegaContext training step.

    The contexts' randomness derives from (seed, step, process), so a resumed run repeats it.
    """
    layout = Layout.from_config(config)
    rows, seq_len = batch["inputs"].shape
    stops = batch.get("stop", np.full(rows, seq_len, np.int32))
    cursors = np.asarray(stops, np.int32) - layout.scored
    rng = np.random.default_rng([config.seed, step, jax.process_index()])
    sources = batch.get("source") if config.mc.needle_variants else None
    contexts, expand_lod, from_pyramid = variants.training_contexts(
        cursors.tolist(),
        config.mc.num_random_variants,
        layout,
        rng,
        config.mc.deep_fraction,
        None if sources is None else np.asarray(sources).tolist(),
    )
    tokens = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    out = {
        **{k: v for k, v in batch.items() if k not in ("stop", "source")},
        **contexts,
        "tokens": tokens,
        "cursor": cursors,
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


def evaluate(eval_step, params, batches, mesh, rows: int, per_token: float) -> dict[str, float]:
    """Validation loss (nats per token) and bits per byte (``per_token``: bytes per token) over
    fixed batches."""
    nll, count = 0.0, 0
    for batch in batches:
        s, n = eval_step(params, sharding.global_batch(_local_rows(batch, rows), mesh))
        nll, count = nll + float(s), count + int(n)
    loss = nll / max(count, 1)
    return {"val/loss": loss, "val/bpb": loss / math.log(2) / per_token}


def phases(config: ml_collections.ConfigDict) -> list[Phase]:
    """The run's phases: the curriculum (if any), then the main phase."""
    cur, t, mc = config.curriculum, config.train, config.mc
    out = []
    if cur.steps:
        what = "the base model alone, plain LM loss"
        out.append(Phase("curriculum", 1, cur.steps, cur.batch_size, cur.seq_len, what))
    if t.steps > cur.steps:
        name, what = (
            ("mc", f"MegaContext objective ({mc.mode})")
            if mc.enabled
            else ("train", "plain LM loss")
        )
        out.append(Phase(name, cur.steps + 1, t.steps, t.batch_size, config.data.seq_len, what))
    return out


def _record(prefix: str, fetched: list[dict]) -> dict[str, float]:
    """One log record of a phase's steps since the last: means of its metrics under ``prefix``
    (the MegaContext phase's summed ``loss`` becomes ``mc/objective``), the latest ``lr``."""
    record = {}
    for key in fetched[0]:
        # float64 whatever the source (fresh float32 scalars or floats restored from JSON), so a
        # resumed run's means equal an uninterrupted run's bit for bit.
        values = np.asarray([m[key] for m in fetched], np.float64)
        name = "objective" if prefix == "mc" and key == "loss" else key
        if key == "lr":
            record[f"{prefix}/lr"] = float(values[-1])
        elif not np.isnan(values).all():
            record[f"{prefix}/{name}"] = float(np.nanmean(values))
    return record


def _floats(metrics: list[dict]) -> list[dict[str, float]]:
    """Step metrics as JSON-able floats (the checkpoint's ``pending`` item)."""
    return [{k: float(v) for k, v in m.items()} for m in jax.device_get(metrics)]


def _postfix(prefix: str, record: dict[str, float], rate: float | None) -> dict[str, str]:
    shown = (
        {"lm": record["mc/lm_tokens"], "objective": record["mc/objective"]}
        if prefix == "mc"
        else {"loss": record[f"{prefix}/loss"]}
    )
    out = {k: f"{v:.3f}" for k, v in shown.items()}
    if rate is not None:
        out["tok_s"] = f"{rate:,.0f}"
    return out


def _log(step: int, prefix: str, pending: list[dict], bar: PhaseBar, writer) -> dict:
    """Writes one record of the steps since the last (``_record``) and shows it on the bar."""
    record = _record(prefix, jax.device_get(pending))
    rate = bar.tokens_per_s()
    if rate is not None:
        record[f"{prefix}/tokens_per_s"] = rate
    writer.write(step, record)
    bar.show(**_postfix(prefix, record, rate))
    return record


def _param_counts(params: nnx.State) -> dict[str, int]:
    if "gistnet" in params.raw_mapping:
        return {part: count_params(params[part]) for part in ("base", "gistnet", "lensnet")}
    return {"base": count_params(params)}


def train(
    config: ml_collections.ConfigDict,
    *,
    stop_at: int | None = None,
    progress: bool = True,
    defaults: ml_collections.ConfigDict | None = None,
    source: str = "config",
) -> dict[str, float]:
    """Trains (or resumes) the run in ``config.workdir``; returns the latest value of every
    metric (and ``step``, the last step done).

    ``stop_at`` ends this invocation after that step with a checkpoint, as an interruption would;
    running again with the same workdir resumes exactly where it stopped. ``defaults`` (the
    config file's own values) and ``source`` (its name) only make the start-up block's config
    diff. A resume whose config changes what the checkpoints hold fails before anything is
    written (``checkpoint.check_resume``).
    """
    workdir = Path(config.workdir)
    if config.model.family == "llama":
        from megacontext_jax.nets.llama import sync_config

        sync_config(config)
        validate(config)  # the checkpoint's sizes against the MegaContext settings
    check_resume(workdir, config)
    check_base_chain(workdir, config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    for p in phases(config):
        if p.batch_size % mesh.size or p.batch_size % jax.process_count():
            field = "curriculum.batch_size" if p.name == "curriculum" else "train.batch_size"
            raise ValueError(
                f"config.{field}={p.batch_size} must be divisible by the {mesh.size} devices "
                f"and {jax.process_count()} processes"
            )
    # The curriculum's last step is kept: another run can start from it (shared_curriculum).
    kept = (config.curriculum.steps,) if config.curriculum.steps else ()
    with Checkpointer(workdir, config.train.keep_checkpoints, keep_steps=kept) as checkpointer:
        start = checkpointer.latest_step() or 0
        # (A damaged last step is no finished run: the restore below falls back from it.)
        if start >= config.train.steps and start and checkpointer.damage(start) is None:
            tqdm.write(
                f"{workdir} is a finished run (step {start} of train.steps={config.train.steps}): "
                "nothing to train; raise --config.train.steps to go on"
            )
            return {**latest_metrics(workdir), "step": start, "finished": True}
        diff = config_diff(config, defaults) if defaults is not None else {}
        with Stop().installed() as stop:
            return _run(config, mesh, checkpointer, start, stop, stop_at, progress, source, diff)


def _data(config: ml_collections.ConfigDict, tokenizer, stop: Stop):
    """The run's documents: training documents, fixed validation batches, the unigram baseline
    in bits per byte and the bytes per token of the validation text."""
    docs = stop.wait_for(
        lambda: data.tokenize(
            data.load_documents(config.data.source, config.data.jsonl_field), tokenizer
        )
    )
    train_docs, val_docs = data.split_documents(docs, config.data.val_fraction)
    val_batches = data.validation_batches(
        val_docs, config.data.seq_len, config.train.batch_size, config.train.eval_batches, tokenizer
    )
    token_bytes = tokenizer.token_bytes()
    unigram_bpb = data.unigram_bits_per_byte(train_docs, val_batches, token_bytes)
    return train_docs, val_batches, unigram_bpb, data.bytes_per_token(val_batches, token_bytes)


def _stage_batches(config: ml_collections.ConfigDict, train_docs, tokenizer, after_step: int):
    """The training iterator of the step after ``after_step`` (the curriculum's or the main
    one); its state is what a checkpoint at ``after_step`` records."""
    cur, mc = config.curriculum, config.mc
    in_curriculum = after_step < cur.steps
    global_bs = cur.batch_size if in_curriculum else config.train.batch_size
    draws_stops = mc.enabled and mc.min_history > 0 and not in_curriculum
    dataset = data.train_dataset(
        train_docs,
        cur.seq_len if in_curriculum else config.data.seq_len,
        global_bs // jax.process_count(),
        config.seed,
        jax.process_index(),
        jax.process_count(),
        (cur if in_curriculum else config.data).passkey_fraction,
        tokenizer,
        (cur if in_curriculum else config.data).repeat_fraction,
        mc.min_history + mc.scored_tokens if draws_stops else 0,
    )
    return iter(dataset)


def _save_interrupted(state, stop: Stop, checkpointer: Checkpointer, config, data_iter, pending):
    """On an interruption: a checkpoint of the last step done, unless there is nothing to save.

    A second SIGINT can land while a step holds the donated state: nothing to save then; nor
    for a lone process of many (only an agreed stop saves there) or before step 1.
    """
    leaves = jax.tree.leaves(state)
    deleted = any(isinstance(x, jax.Array) and x.is_deleted() for x in leaves)
    lone = jax.process_count() > 1 and not stop.agreed
    done = None if deleted or lone else int(state.step)
    if done and checkpointer.latest_step() != done:
        tqdm.write(f"interrupted: saving a checkpoint at step {done}")
        checkpointer.save(done, checkpointed(state, config), data_iter, _floats(pending))


def _run(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    checkpointer: Checkpointer,
    start: int,
    stop: Stop,
    stop_at: int | None,
    progress: bool,
    source: str,
    diff: dict,
) -> dict[str, float]:
    """Start-up (data, state, compilation: a stop request ends it at once) and the loop."""
    workdir = Path(config.workdir)
    run_phases = phases(config)
    global_bs, seq_len = config.train.batch_size, config.data.seq_len
    rows = global_bs // jax.process_count()
    curriculum = config.curriculum.steps

    tokenizer = tokenizer_for(config.model)
    train_docs, val_batches, unigram_bpb, per_token = _data(config, tokenizer, stop)
    stage_batches = partial(_stage_batches, config, train_docs, tokenizer)

    stop.check()
    trainable = make_trainable(config, mesh)
    restored_pending: list[dict[str, float]] = []
    reused_rows: list[dict] | None = None  # the curriculum's metric rows of the run reused
    if start:
        # The newest intact step: a damaged latest one is skipped with a line saying so.
        abstract = checkpointed(trainable.abstract_state(), config)
        restored = stop.wait_for(lambda: checkpointer.restore(abstract, stage_batches, tqdm.write))
        state, start, data_iter, restored_pending = restored
    elif config.curriculum.reuse_from:
        state, reused_rows = stop.wait_for(
            lambda: shared_curriculum.restore(config, trainable, mesh)
        )
        start, data_iter = curriculum, stage_batches(curriculum)
    else:
        state, data_iter = stop.wait_for(trainable.init), stage_batches(0)
    if frozen_base(config):
        state = stop.wait_for(lambda: attach_base(state, trainable, config))
    stop.check()
    write_config(workdir, config)  # only now: a resume that failed above changed nothing
    if reused_rows is not None:  # the run's own record of where it starts (and resumes from)
        checkpointer.save(start, checkpointed(state, config), data_iter)
    train_step, eval_step = make_train_step(trainable), make_eval_step(trainable)
    base_step = make_train_step(trainable, base_only=True) if curriculum else None
    process0 = jax.process_index() == 0
    counts = _param_counts(state.params)
    if progress and process0:
        tqdm.write(
            startup_block(
                workdir=str(workdir),
                resumed_from=start or None,
                reused=None if reused_rows is None else config.curriculum.reuse_from,
                mesh=mesh,
                params=counts,
                phases=run_phases,
                config_source=source,
                diff=diff,
            )
        )
    fresh = start == 0 or reused_rows is not None
    writer = MetricsWriter(workdir, 0 if fresh else start, log=tqdm.write)
    if fresh:
        writer.write(0, {"params": sum(counts.values()), "val/unigram_bpb": unigram_bpb})
        writer.text("config", to_json(config))
        for row in reused_rows or ():
            writer.write(row["step"], {k: v for k, v in row.items() if k != "step"})

    end = config.train.steps if stop_at is None else min(stop_at, config.train.steps)
    summary: dict[str, float] = {**latest_metrics(workdir), "val/unigram_bpb": unigram_bpb}
    step, bar, pending = start, None, []
    try:
        for phase in run_phases:
            last = min(phase.last, end)
            if step >= last:
                continue
            bar = PhaseBar(phase, enabled=progress and process0)
            run_step = base_step if phase.name == "curriculum" else train_step
            pending, first = restored_pending, step + 1
            restored_pending = []
            for step in range(first, last + 1):
                stop.before(step)
                batch = next(data_iter)
                if phase.name == "mc":
                    batch = mc_batch(batch, step, config)
                batch = sharding.global_batch(batch, mesh)
                if bar.bar is None:  # compile where a stop request is taken at once
                    run_step = stop.wait_for(
                        lambda: run_step.lower(state, batch).compile()  # noqa: B023
                    )
                state, metrics = run_step(state, batch)
                pending.append(metrics)
                if bar.bar is None:  # the phase's first step has compiled: start the clock
                    jax.block_until_ready(metrics)
                    bar.started(step)
                else:
                    # The bar counts finished steps: it waits for the previous one only, so
                    # the host prepares the next batch while the device runs this step.
                    if len(pending) > 1:
                        jax.block_until_ready(pending[-2])
                    bar.step()
                if step == curriculum:
                    data_iter = stage_batches(step)
                if step % config.train.log_every == 0 or step == phase.last:
                    summary.update(_log(step, phase.name, pending, bar, writer))
                    pending = []
                if step % config.train.eval_every == 0 or step == config.train.steps:
                    with bar.paused():
                        val = evaluate(eval_step, state.params, val_batches, mesh, rows, per_token)
                    writer.write(step, val)
                    summary.update(val)
                    bar.write(
                        f"step {step}: validation loss {val['val/loss']:.4f} nats/token, "
                        f"{val['val/bpb']:.4f} bits/byte (unigram {unigram_bpb:.4f})"
                    )
                if step % config.train.checkpoint_every == 0 or step in (end, curriculum):
                    with bar.paused():
                        checkpointer.save(
                            step, checkpointed(state, config), data_iter, _floats(pending)
                        )
            bar.close()
            if step == curriculum and end > curriculum:
                tqdm.write(f"step {step}: curriculum done, training on {seq_len}-token sequences")
    except KeyboardInterrupt:
        _save_interrupted(state, stop, checkpointer, config, data_iter, pending)
        raise
    finally:
        if bar is not None:
            bar.close()
        checkpointer.wait()
        writer.close()
    if writer.enabled and writer.path.exists():
        plot_loss_curve(writer.path, workdir / "loss.png")
    summary["step"] = step
    return summary
