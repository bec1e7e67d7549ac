"""The training loop: one pass over one source feeds every SAE of a sweep.

SAEs of the same shape form a group and are stepped together (stacked parameters, batched
matmuls); each batch is read once, normalised once per hook, and given to every group.
Checkpoints (weights + Adam state as safetensors, trainer + reader state as JSON) let
``resume=True`` finish a killed run with bitwise-identical weights on CPU. While it trains, each
SAE's config says "training" with its progress and a heartbeat (``saelake.lake.heartbeat``), so a
killed run shows as stalled. The final metrics are measured on held-out rows (``holdout.py``).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import torch
from tqdm import tqdm

from saelake.lake import Lake, LiveSource, SnapshotSource, UserError
from saelake.lake.heartbeat import beat, heartbeat_s
from saelake.lake.storage import check_name

from . import holdout, inputs
from .config import SAEConfig, SourceConfig
from .dist import Comm
from .group import Group
from .kernels import keep_freed_memory
from .store import METRIC_DEFINITIONS, SAEStore, fold_normalization, now, scale_vector

IDENTITY_SKIP = ("name",)
SLOW = float(os.environ.get("SAELAKE_TRAIN_SLOW", "0"))  # config keys that may differ on --resume: none but the name


class Trainer:
    """Train ``saes`` (a sweep) over one source. ``run()`` returns the final SAE configs."""

    def __init__(
        self,
        src: SourceConfig,
        saes: list[SAEConfig],
        *,
        resume: bool = False,
        progress: bool = True,
        stop_after: int | None = None,
    ):
        self.src, self.saes, self.resume, self.progress, self.stop_after = src, saes, resume, progress, stop_after
        self.lake = Lake(src.lake)
        self.store = SAEStore(self.lake)
        if src.tokens <= 0 or src.batch_size <= 0:
            raise UserError(f"--tokens and --batch-size must be positive, got {src.tokens} and {src.batch_size}")
        if not saes:
            raise UserError("nothing to train: no SAE configured")
        names = [s.name for s in saes]
        if len(set(names)) != len(names):
            raise UserError(f"SAE names must be unique in a sweep: {', '.join(names)}")
        for n in names:
            check_name(n, "SAE name")
        self.comm = Comm(src.device)
        self.all_names, self.parallel = names, None
        W, R = self.comm.world, self.comm.rank
        if self.comm.active:
            self.parallel = src.parallel or ("sweep" if len(saes) >= W and len(saes) > 1 else "data")
            if self.parallel not in ("data", "sweep"):
                raise UserError(f"--parallel must be data or sweep, got {self.parallel!r}")
            if self.parallel == "sweep":
                if len(saes) < W:
                    raise UserError(
                        f"sweep-parallel training needs at least one SAE per rank: {len(saes)} SAEs, "
                        f"{W} ranks (use --parallel data)"
                    )
                saes = self.saes = saes[R::W]  # rank r: SAEs r, r + W, ... (each reads the snapshot once)
            elif src.batch_size % W or src.tokens % src.batch_size:
                raise UserError(
                    f"data-parallel training over {W} ranks: --batch-size ({src.batch_size}) must be a "
                    f"multiple of the number of ranks and --tokens ({src.tokens}) a multiple of it"
                )
        self.hooks = list(dict.fromkeys(h for s in saes for h in s.hooks + s.all_out_hooks))
        reads = {s._kind().context_input for s in saes}
        if len(reads) > 1:
            raise UserError(
                "kinds that read whole contexts (lorsa) and kinds that read tokens cannot share one "
                "sweep: train them in separate runs"
            )
        self.contexts = reads == {True}  # the sweep reads whole contexts (the 2d table or live contexts)
        if self.contexts and self.parallel == "data":
            raise UserError(
                "data-parallel training of kinds that read whole contexts is not supported: use "
                "--parallel sweep or one process"
            )
        self.source = self._open_source()
        self.d_model = {h: self.source.d_model[h] for h in self.hooks}
        for s in saes:
            s.resolve(self.source.d_model, src.tokens, src.batch_size, self.model_spec)
        # a step reads step_rows rows: tokens, or contexts of T tokens (as many as fit in --batch-size)
        self.T = self.source.context_size if self.contexts else 1
        self.step_rows = max(1, src.batch_size // self.T)
        self.step_tokens = self.step_rows * self.T
        self.total_steps = math.ceil(src.tokens / self.step_tokens)
        self.ckpt_every = src.checkpoint_every or max(1, self.total_steps // 5)
        self.log_every = src.log_every or max(1, self.total_steps // 100)
        err = None
        try:
            for s in saes:
                if self.store.exists(s.name) and not resume:
                    raise UserError(
                        f"SAE name {s.name!r} is taken in {self.lake.root}: pick another --name, or --resume it"
                    )
                if not resume and (self.parallel != "data" or R == 0):  # of two trainings named alike, one goes on
                    self.lake.storage.claim("saes", s.name, owner="lake train")
            self.start = self._resume_state() if resume else None
        except UserError as e:
            err = e
        if self.comm.active:  # every rank agrees before anyone writes
            if int(self.comm.max_(torch.tensor([int(err is not None)]))[0]) and err is None:
                err = UserError("another rank refused this run (see its message above)")
            self.comm.barrier()
        if err is not None:
            raise err

    # -- source ----------------------------------------------------------------------------------
    def _open_source(self):
        s = self.src
        if s.live:
            if not s.model or not s.dataset:
                raise UserError("--live needs --model and --dataset")
            src = LiveSource(s.model, s.dataset, self.hooks, s.context_size, text_column=s.text_column, device=s.device)
            self.holdout = holdout.plan(
                s.holdout, n_rows=None, train_tokens=s.tokens, context_size=s.context_size if self.contexts else None
            )
            self.stats, self.model_spec, self.bos_excluded = None, s.model, True
            self.bos = src.model.bos_token_id
            self.snapshot = None
            return src
        if not s.run:
            raise UserError("give a snapshot with --run RUN [--version V], or --live --model M --dataset D")
        src = SnapshotSource(self.lake, s.run, s.version)
        for h in self.hooks:
            if h not in src.hooks:
                raise UserError(f"hook {h!r} is not in run {s.run!r}: it has {', '.join(src.hooks)}")
        T = src.context_size if self.contexts else 1
        if self.contexts and "contexts" not in src.snapshot.tables:
            raise UserError(
                f"run {s.run!r} has no 2d table, and this kind reads whole contexts: ingest one with "
                "`lake ingest --layout 2d ...` or train --live"
            )
        self.holdout = h = holdout.plan(
            s.holdout,
            n_rows=src.n_contexts if self.contexts else src.n_tokens,
            train_tokens=s.tokens,
            context_size=T if self.contexts else None,
        )
        if h.train_rows and s.tokens > h.train_rows * T and not s.repeat:
            held = f" and {h.tokens * T} held out (--holdout)" if h.tokens else ""
            raise UserError(
                f"--tokens {s.tokens} is more than snapshot {s.run} v{src.version} has for training "
                f"({h.train_rows * T} tokens{held}): lower --tokens or pass --repeat to loop over it"
            )
        m = src.manifest
        self.bos = m.model_info.bos_token_id
        self.stats = {h: {"mean_norm": m.stats[h].mean_norm, "median_norm": m.stats[h].median_norm} for h in self.hooks}
        self.model_spec, self.bos_excluded = m.model, not m.keep_bos
        self.snapshot = (s.run, src.version)
        return src

    # -- resume ----------------------------------------------------------------------------------
    def _resume_state(self) -> dict:
        states = {}
        for s in self.saes:
            if not self.store.exists(s.name):
                raise UserError(f"--resume: no SAE {s.name!r} to resume in {self.lake.root}")
            old = self.store.config(s.name)
            if old.get("status") == "complete":
                raise UserError(f"--resume: SAE {s.name!r} is already complete")
            if "source.holdout" not in old.get("identity", {}):  # started before holdouts: keep its stream
                self.holdout = holdout.Holdout(0, None, self.holdout.n_rows)
            new = self.identity(s)
            for key, value in old.get("identity", {}).items():
                if new.get(key) != value:
                    raise UserError(
                        f"--resume with a different config: SAE {s.name} key {key!r} was {value!r}, "
                        f"now {new.get(key)!r}; repeat the original settings"
                    )
            ck = self.store.read_checkpoint(s.name)
            if ck is None:
                raise UserError(f"--resume: SAE {s.name!r} has no checkpoint yet; start it again under a new name")
            states[s.name] = ck
        steps = {st["step"] for _, st in states.values()}
        if len(steps) != 1:
            raise UserError(f"--resume: the SAEs of this sweep have checkpoints at different steps {sorted(steps)}")
        return states

    def identity(self, s: SAEConfig) -> dict:
        d = {k: v for k, v in asdict(s).items() if k not in IDENTITY_SKIP}
        src = asdict(self.src)
        for k in (
            "run",
            "version",
            "live",
            "model",
            "dataset",
            "context_size",
            "tokens",
            "batch_size",
            "repeat",
            "data_seed",
        ):
            d[f"source.{k}"] = src[k]
        d["source.version"] = self.snapshot[1] if self.snapshot else None
        d["source.holdout"] = self.holdout.tokens
        return d

    # -- the loop --------------------------------------------------------------------------------
    def _config(self, s: SAEConfig, g: Group, status: str, norm: dict, extra: dict) -> dict:
        return {
            "name": s.name,
            "arch": s.arch,
            "hook": ",".join(s.hooks),
            "out_hook": ",".join(s.all_out_hooks),
            "hooks": s.hooks,
            "out_hooks": s.all_out_hooks,
            "d_in": g.d_in,
            "d_sae": s.d_sae,
            "d_out": g.d_out,
            "k": s.k,
            "run": self.snapshot[0] if self.snapshot else None,
            "version": self.snapshot[1] if self.snapshot else None,
            "model": self.model_spec,
            "source": "snapshot" if self.snapshot else "live",
            "dataset": self.src.dataset if self.src.live else None,
            "status": status,
            "created": extra.get("created") or now(),
            "updated": now(),
            "apply_b_dec_to_input": g.model.apply_b_dec_to_input,
            "hyperparameters": asdict(s),
            "training": {
                "tokens": self.src.tokens,
                "batch_size": self.src.batch_size,
                "steps": self.total_steps,
                "parallel": self.parallel,
                "world_size": self.comm.world,
                "data_seed": self.src.data_seed,
                "repeat": self.src.repeat,
                "device": self.src.device,
                "autocast": self.src.autocast,
                "stacked_with": [c.name for c in g.cfgs],
                **({"contexts_per_step": self.step_rows, "order": "contexts in order"} if self.contexts else {}),
            },
            "normalization": {
                "method": s.normalize,
                "target": "E|x| = sqrt(d) per hook",
                "hooks": {h: norm[h] for h in s.hooks + s.all_out_hooks},
                "folded": False,
            },
            "bos_excluded": self.bos_excluded or self.contexts,
            "outlier_factor": s.outlier_factor,
            "outlier_rule": "drop tokens whose norm at any of the SAE's hooks exceeds outlier_factor x that hook's "
            "median norm",
            "dead_window": s.dead_window,
            "holdout": self.holdout.record(),
            "metric_definitions": METRIC_DEFINITIONS,
            "identity": self.identity(s),
            **extra,
        }

    def _beat(self, by_name: dict, norm: dict, created: str, step: int, every_s: float) -> None:
        """Each SAE's config on disk: status "training", progress, heartbeat (a small JSON write)."""
        tokens = min(self.src.tokens, step * self.step_tokens)
        progress = {"step": step, "steps": self.total_steps, "tokens": tokens, "tokens_total": self.src.tokens}
        for s in self.saes:
            extra = {"created": created, "progress": progress, **beat(every_s)}
            self.store.save(self._config(s, by_name[s.name][0], "training", norm, extra), register=False)

    def run(self) -> list[dict]:
        src, device = self.src, self.src.device
        keep_freed_memory()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
        groups: dict[tuple, list[SAEConfig]] = {}
        for s in self.saes:
            groups.setdefault(s.group_key(), []).append(s)
        groups = [Group(cfgs, self.d_model, device) for cfgs in groups.values()]
        by_name = {c.name: (g, i) for g in groups for i, c in enumerate(g.cfgs)}
        step, rows, created, dropped, norm, metrics = 0, 0, now(), {s.name: 0 for s in self.saes}, None, {}
        # sq, var, l0·B, tokens, and sq, var per out hook (several out hooks): the last 10% of steps
        window = {s.name: [0.0, 0.0, 0.0, 0, [], []] for s in self.saes}
        if self.start:
            for name, (tensors, state) in self.start.items():
                g, i = by_name[name]
                g.load_member_tensors(i, tensors)
                g.adam_t, g.thr_steps = state["adam_t"], state["thr_steps"]
                step, rows, norm, created = state["step"], state["rows"], state["norm"], state["created"]
                dropped[name], window[name] = state["dropped"], (state["window"] + [[], []])[:6]
                metrics[name] = self.store.metrics(name)[: state["n_metrics"]]
        autocast = (
            torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if src.autocast == "bf16" else nullcontext()
        )
        dp = self.parallel == "data"
        W, R = self.comm.world, self.comm.rank
        writer = not dp or R == 0  # data-parallel: the replicas are identical, rank 0 writes
        comm = self.comm if dp else None
        # data-parallel: the single-process row stream cut into micro-batches; rank r reads only its own
        batches = holdout.training_batches(
            self.source,
            self.holdout,
            self.step_rows // W if dp else self.step_rows,
            self.hooks,
            seed=src.data_seed,
            start=rows,
            repeat=src.repeat,
            shard=(R, W) if dp else (0, 1),
        )
        bar = tqdm(
            total=src.tokens,
            initial=min(rows * self.T, src.tokens),
            unit="tok",
            unit_scale=True,
            disable=not self.progress or R != 0,
            desc="train",
            dynamic_ncols=True,
        )
        t0, status = time.perf_counter(), "complete"
        every_s, pulse = heartbeat_s(), {"t": time.monotonic(), "step": step, "beats": 0}

        def heartbeat():  # the expected gap between beats: the target plus a step (a beat waits for it)
            step_s = (time.monotonic() - pulse["t"]) / max(1, step - pulse["step"])
            self._beat(by_name, norm, created, step, every_s + step_s)
            pulse.update(t=time.monotonic(), step=step, beats=pulse["beats"] + 1)

        for batch in batches:
            if step >= self.total_steps:
                break
            if norm is None:  # first batch of a fresh run: norm stats, b_dec init
                first = (
                    SimpleNamespace(acts={h: self.comm.gather_rows(a) for h, a in batch.acts.items()}) if dp else batch
                )
                norm = inputs.norm_stats(first, self.stats, self.d_model, self.bos if self.contexts else None)
                inputs.init_from_data(groups, first, norm, device)
            if writer and (not pulse["beats"] or time.monotonic() - pulse["t"] >= every_s):
                heartbeat()  # the first one puts the config on disk
            n_take = min(len(batch), -(-(src.tokens - step * self.step_tokens) // self.T))  # rows
            n_global = n_take * self.T * (W if dp else 1)  # tokens
            log_now = step % self.log_every == 0 or step == self.total_steps - 1
            in_window = step >= self.total_steps - max(1, self.total_steps // 10)
            xs = inputs.group_inputs(
                batch, n_take, norm, groups, self.hooks, device, self.bos if self.contexts else None
            )
            shown = {}
            for g in groups:
                x, y, rows_kept = xs[g.input_key]
                out = g.step(
                    x,
                    y,
                    step,
                    self.total_steps,
                    g.cfg.dead_window,
                    autocast,
                    stats=log_now,
                    comm=comm,
                    window=in_window,
                    rows=rows_kept,
                )
                N = out.tokens  # tokens kept in the (global) batch
                for i, s in enumerate(g.cfgs):
                    dropped[s.name] += n_global - N
                    if in_window:
                        window[s.name] = _add_to_window(window[s.name], out, i)
                    if log_now:
                        fvu = out.fvu(i)
                        rows_ = {
                            "loss": out.loss[i],
                            "mse": out.mse[i],
                            "fvu": fvu,
                            "l0": out.l0[i],
                            "dead_fraction": out.dead_fraction[i],
                            "lr": out.lr[i],
                            "l1": out.l1[i],
                            "aux_loss": out.aux_loss[i],
                        }
                        if s.k:
                            rows_["k"] = out.k[i]
                        if out.hook_sq is not None:
                            rows_ |= {
                                f"fvu:{h}": out.hook_sq[i, j] / out.hook_var[i, j].clamp_min(1e-12)
                                for j, h in enumerate(s.all_out_hooks)
                            }
                        metrics.setdefault(s.name, []).extend(
                            {"step": step, "tokens": (step + 1) * self.step_tokens, "name": k, "value": float(v)}
                            for k, v in rows_.items()
                        )
                        shown.setdefault("fvu", []).append(fvu)
                        shown.setdefault("l0", []).append(float(out.l0[i]))
                        shown.setdefault("loss", []).append(float(out.loss[i]))
            step += 1
            rows += len(batch) * (W if dp else 1)
            if SLOW:  # tests: widen the window in which a kill lands between checkpoints
                time.sleep(SLOW)
            bar.update(n_global)
            if shown:
                bar.set_postfix({k: f"{sum(v) / len(v):.3g}" for k, v in shown.items()}, refresh=False)
            if step < self.total_steps and step % self.ckpt_every == 0:
                if writer:
                    self._checkpoint(groups, step, rows, norm, created, dropped, window, metrics)
                    heartbeat()
                if self.stop_after is not None and step >= self.stop_after:
                    status = "interrupted"
                    break
        bar.close()
        if step < self.total_steps and status == "complete":
            raise UserError(
                f"the source ran out after {step} of {self.total_steps} steps: pass --repeat or lower --tokens"
            )
        seconds = time.perf_counter() - t0
        if status != "complete":
            self.comm.barrier()
            return [dict(self.store.config(s.name), status=status, step=step) for s in self.saes]
        folded = {
            s.name: self._folded(s, by_name[s.name][0].model.member_state(by_name[s.name][1]), norm) for s in self.saes
        }
        heldout = self._heldout(by_name, folded, norm) if writer else {}
        out = [
            self._finish(
                s,
                *by_name[s.name],
                norm,
                created,
                dropped[s.name],
                window[s.name],
                metrics.get(s.name, []),
                step,
                seconds,
                folded[s.name],
                heldout.get(s.name),
            )
            for s in self.saes
        ]
        if self.comm.active:  # every rank's SAEs are on disk: rank 0 registers them all (one catalog writer)
            self.comm.barrier()
            if R == 0:
                for name in self.all_names:
                    self.store.register(name)
            self.comm.barrier()
        return out

    def _checkpoint(self, groups, step, rows, norm, created, dropped, window, metrics) -> None:
        for g in groups:
            for i, s in enumerate(g.cfgs):
                state = {
                    "step": step,
                    "rows": rows,
                    "adam_t": g.adam_t,
                    "thr_steps": g.thr_steps,
                    "norm": norm,
                    "created": created,
                    "dropped": dropped[s.name],
                    "window": window[s.name],
                    "n_metrics": len(metrics.get(s.name, [])),
                    "reader": self.source.state(),
                }
                self.store.st.write_json(metrics.get(s.name, []), "saes", s.name, "metrics.json")
                self.store.write_checkpoint(s.name, g.member_tensors(i), state)

    def _folded(self, s: SAEConfig, state: dict, norm: dict) -> dict[str, torch.Tensor]:
        """The member's weights with the normalization folded in: they take raw activations."""
        dev = next(iter(state.values())).device
        s_in = scale_vector(s.hooks, {h: norm[h]["scale"] for h in s.hooks}, self.d_model).to(dev)
        s_out = self._scale_out(s, norm).to(dev)
        if s.normalize == "none":
            s_in = torch.ones_like(s_in)
        return fold_normalization(state, s_in, s_out, s.arch)

    def _scale_out(self, s: SAEConfig, norm: dict) -> torch.Tensor:
        """Raw -> normalised units of the SAE's output (ones when it trained on raw activations)."""
        if s.normalize == "none":
            return torch.ones(sum(self.d_model[h] for h in s.all_out_hooks))
        return scale_vector(s.all_out_hooks, {h: norm[h]["scale"] for h in s.all_out_hooks}, self.d_model)

    def _heldout(self, by_name: dict, folded: dict, norm: dict) -> dict[str, dict]:
        """Per SAE: FVU, L0, dead fraction on the held-out rows (read once for the whole sweep)."""
        if not self.holdout.tokens:
            return {}
        device = self.src.device
        members = [
            holdout.member(
                s, by_name[s.name][0].model.apply_b_dec_to_input, folded[s.name], self._scale_out(s, norm), norm, device
            )
            for s in self.saes
        ]
        batches = holdout.heldout_batches(
            self.source, self.holdout, self.step_rows, self.hooks, seed=self.src.data_seed
        )
        return holdout.evaluate(members, batches, device, bos=self.bos)

    def _finish(
        self,
        s: SAEConfig,
        g: Group,
        i: int,
        norm: dict,
        created: str,
        dropped: int,
        window: list,
        metrics: list[dict],
        step: int,
        seconds: float,
        weights: dict,
        heldout: dict | None,
    ) -> dict:
        sq, var, l0n, ntok, hook_sq, hook_var = window
        dead = g.since_fired[i] >= min(s.dead_window, step * self.step_tokens)
        final = {
            "fvu": sq / var if var else None,
            "l0": l0n / ntok if ntok else None,
            "dead_fraction": float(dead.float().mean()),
        }
        per_hook = {h: a / b if b else None for h, a, b in zip(s.all_out_hooks, hook_sq, hook_var)}
        tokens = min(self.src.tokens, step * self.step_tokens)
        held = heldout or {}
        extra = {
            "created": created,
            "tokens_trained": tokens,
            "tokens_dropped_outliers": dropped,
            "train_seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
            **final,
            "explained_variance": 1 - final["fvu"] if final["fvu"] is not None else None,
            "final_metrics": {
                "window": "in-sample: training batches of the last 10% of steps (at least one), normalised units",
                "fvu": final["fvu"],
                "l0": final["l0"],
                "dead_fraction": final["dead_fraction"],
                "dead_window_tokens": min(s.dead_window, tokens),
                **({"fvu_per_hook": per_hook} if per_hook else {}),
            },
            **{f"heldout_{k}": held.get(k) for k in ("fvu", "l0", "dead_fraction")},
            "holdout": {
                **self.holdout.record(),
                **(
                    {
                        "tokens_evaluated": held["tokens"],
                        "fvu": held["fvu"],
                        "l0": held["l0"],
                        **({"fvu_per_hook": held["fvu_per_hook"]} if held.get("fvu_per_hook") else {}),
                        "dead_fraction": held["dead_fraction"],
                        "dead_window_tokens": held["tokens"],
                        "units": "normalised, as the in-sample numbers; outlier rule as in training",
                    }
                    if held
                    else {}
                ),
            },
        }
        cfg = self._config(s, g, "complete", norm, extra)
        cfg["normalization"]["folded"] = True  # the weights below take raw activations
        per_hook = {f"fvu:{h}": v for h, v in per_hook.items()}
        held_hook = {f"fvu:{h}": v for h, v in (held.get("fvu_per_hook") or {}).items()}
        final_rows = [
            {"step": step, "tokens": tokens, "name": f"{prefix}_{k}", "value": float(v)}
            for prefix, values in (("final", final | per_hook), ("heldout", held | held_hook))
            for k, v in values.items()
            if k not in ("tokens", "fvu_per_hook") and v is not None
        ]
        if self.parallel != "data" or self.comm.rank == 0:
            self.store.save(cfg, weights, metrics + final_rows, register=not self.comm.active)
        return cfg


def _add_to_window(w: list, out, i: int) -> list:
    """Member ``i``'s step ``out`` added to its window sums: sq, var, l0·tokens, tokens, and sq, var per out hook."""
    sq, var, l0n, n, hook_sq, hook_var = w
    N = out.tokens
    if out.hook_sq is not None:
        hook_sq = [a + float(b) for a, b in zip(hook_sq or [0.0] * out.hook_sq.shape[1], out.hook_sq[i])]
        hook_var = [a + float(b) for a, b in zip(hook_var or [0.0] * out.hook_var.shape[1], out.hook_var[i])]
    return [sq + float(out.sq[i]), var + float(out.var[i]), l0n + float(out.l0[i]) * N, n + N, hook_sq, hook_var]
