"""One training step of VEAD + IM on MMEdit records with the backbone frozen (`Trainer`; the run around it,
checkpointed and resumable, is `editing.training.loop.train`).

One step takes ``batch_size`` records; each contributes four teacher-forced rows (rel, t_gen, m_gen,
m_loc; text-only T-Loc inputs bypass the adapter, so they carry no gradient) with the record's own
edit signal, plus ``loc_partners`` locality rows: the M-Loc inputs of other records drawn per step, under
this record's edit, so locality is not learnt from one fixed unrelated input per edit. The rows run
below the edit site once, under no_grad (`SplitForward.prefix`); only the layers above carry gradients.
Edit signals, pre-edit M-Loc outputs and IM alignment targets are per-record products of the frozen
model, computed once under no_grad (`editing.training.examples`).

Loss = w_rel·NLL(rel) + w_gen·(NLL(t_gen) + NLL(m_gen)) + w_loc·KL(p_pre ‖ p_post)(m_loc + partners)
     + w_align·alignment + w_up·up + w_down·down                       (weights 1, 1, 1, 0.1, 0.1, 0.1)
     [+ w_scene·scene, with a scene gate: its logistic loss, m_gen rows open, M-Loc rows shut (weight 1)]
     [+ w_same·KL(p_pre ‖ p_post)(same-image rows), with ``same_image_weight`` > 0]
The IM terms use, per record, one of its rel / t_gen / m_gen rows (drawn at random) and ``im_tokens``
visual tokens drawn at random: the IM logits of those tokens of that row (visual states at the edit
site) against the row's edit query; the alignment target is the row's own token influence restricted
to the drawn tokens and normalised to sum 1 (and, with ``im_up="influence"``, the up term's weights);
the down term uses the same token indices of the m_loc row.

Determinism: the adapter is re-initialised from ``seed``; record order (a fresh permutation per epoch)
and the per-step draws come from generators seeded by (seed, stream, epoch / step), so any step can be
recomputed from its number, and a resumed run reaches bit-identical weights (on the same machine and
thread count).

Several processes (``accelerate launch``, `attrib.parallel`): every process draws the same global batch and
takes its consecutive share of the records; each loss term is its local mean scaled by the process's share
of the global count (tokens, records or rows), so the summed gradients, added up across processes once per
step, are the global batch's; only the main process checkpoints (docs/gpu.md).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from attrib.data import EditRecord
from attrib.errors import TrainingDiverged
from attrib.parallel import processes, sum_, sum_gradients
from attrib.prompts import load_prompts
from attrib.regions.attention_noise import AttentionNoise
from attrib.regions.noise import noise_generator
from editing.adapter.split import EditSite, SplitForward
from editing.adapter.visedit import VisEditEditor
from editing.inputs import teacher_forced_batch
from editing.training import losses
from editing.training.config import TrainConfig
from editing.training.examples import (
    ALIGN_ROLES,
    ROLES,
    ExampleStore,
    answer_positions,
    example_row,
    example_rows,
    has_same_image,
    stack_signals,
)

_ORDER_STREAM, _STEP_STREAM, _INIT_STREAM, _PARTNER_STREAM, _TOKEN_STREAM = 101, 102, 103, 104, 105  # seeded generators


def reset_adapter(editor: VisEditEditor, seed: int) -> None:
    """Re-draw the adapter's parameters (PyTorch default init, as the official code) from ``seed``."""
    generator_seed = noise_generator(seed, _INIT_STREAM).initial_seed()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        for module in editor.adapter.modules():
            if module is not editor.adapter and hasattr(module, "reset_parameters"):
                module.reset_parameters()


class Trainer:
    """One training run of ``editor``'s adapter on ``records`` (module docstring)."""

    def __init__(self, editor: VisEditEditor, records: Sequence[EditRecord], config: TrainConfig,
                 prompts: dict[str, str] | None = None):
        if not records:
            raise ValueError("no training records")
        if config.im_up not in ("mean", "influence"):
            raise ValueError(f"im_up must be 'mean' or 'influence', got {config.im_up!r}")
        self.editor, self.records, self.config = editor, list(records), config
        self.procs = processes()  # under `accelerate launch`: this process's share of every global batch
        self.procs.slice_of(config.batch_size)  # refuses a batch that does not split evenly
        self.formats = prompts or load_prompts()
        backbone = editor.backbone
        placement = editor.placement
        self.split = SplitForward(backbone, placement.edit_layer, editor.hook)
        it_layers = placement.it_layers or tuple(range(max(placement.edit_layer + 1, 0), backbone.n_layers))
        noise = AttentionNoise(config.influence_sigma, "abs", config.influence_draws, config.seed)
        self.store = ExampleStore(editor, self.split, self.records, config.task, self.formats, it_layers, noise,
                                  config.cache_mb << 20, config.product_chunk, self.influence_pairs())
        self.optimizer = torch.optim.Adam(editor.adapter.parameters(), lr=config.lr)
        self._orders: dict[int, torch.Tensor] = {}  # the last few epochs' permutations

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The seeded permutation of the records for ``epoch`` (0-based)."""
        if epoch not in self._orders:
            if len(self._orders) >= 4:  # steps and the influence order each read one or two epochs at a time
                del self._orders[min(self._orders)]
            generator = noise_generator(self.config.seed, _ORDER_STREAM, epoch)
            self._orders[epoch] = torch.randperm(len(self.records), generator=generator)
        return self._orders[epoch]

    def batch_indices(self, step: int) -> list[int]:
        """Record indices of ``step`` (1-based): consecutive slices of one seeded permutation per epoch."""
        n, size = len(self.records), self.config.batch_size
        positions = range((step - 1) * size, step * size)
        return [int(self.epoch_order(position // n)[position % n]) for position in positions]

    def influence_pairs(self) -> Iterator[tuple[int, int]]:
        """The (record, sample) pairs the IM terms ask influence for, each at its first use, step by step
        from step 1, until every pair has appeared (or 1,000 epochs have passed); it does not depend on
        ``steps``, so a resumed run with more steps chunks its influence work exactly as before."""
        n, seen, step = len(self.records), set(), 1
        while len(seen) < n * len(ALIGN_ROLES) and (step - 1) * self.config.batch_size < 1000 * n:
            indices = self.batch_indices(step)
            own = self.procs.slice_of(len(indices))  # the pairs this process's share asks for
            for pair in zip(indices[own], self.im_roles(step, len(indices))[own].tolist()):
                if pair not in seen:
                    seen.add(pair)
                    yield pair
            step += 1

    def partner_indices(self, step: int, indices: list[int]) -> list[list[int]]:
        """``loc_partners`` lists of one other record per batch record, drawn from a generator of ``step``."""
        n = len(self.records)
        if n < 2 or self.config.loc_partners == 0:
            return []
        generator = noise_generator(self.config.seed, _PARTNER_STREAM, step)
        drawn = torch.randint(n - 1, (self.config.loc_partners, len(indices)), generator=generator)
        return [[int(d) + (int(d) >= i) for d, i in zip(row, indices)] for row in drawn]  # skip the record itself

    def step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns its losses (floats)."""
        config, editor = self.config, self.editor
        batch_indices = self.batch_indices(step)
        own = self.procs.slice_of(len(batch_indices))  # this process's records of the global batch
        partners = [drawn[own] for drawn in self.partner_indices(step, batch_indices)]  # [loc_partners][b]
        roles = self.im_roles(step, len(batch_indices))[own]
        indices = batch_indices[own]
        b = len(indices)
        # Products of the unedited model: before the signal is set.
        signals = [self.store.signal(i) for i in indices]
        loc_records = indices + [i for drawn in partners for i in drawn]  # own M-Loc rows, then the partners'
        pre_loc = [self.store.pre_loc(i) for i in loc_records]
        same = [j for j, i in enumerate(indices) if config.same_image_weight > 0 and has_same_image(self.records[i])]
        pre_same = [self.store.pre_same(indices[j]) for j in same]
        influence = torch.stack([self.store.influence(i, int(r)) for i, r in zip(indices, roles)])
        rows = [example_rows(self.records[i], config.task, self.formats) for i in indices]
        shown = [rows[j][role] for role in ROLES for j in range(b)]  # role-major
        shown += [example_row(self.records[i], "m_loc", config.task, self.formats) for i in loc_records[b:]]
        shown += [example_row(self.records[indices[j]], "same_image", config.task, self.formats) for j in same]
        images, prompts, targets = zip(*shown)
        batch = teacher_forced_batch(editor.backbone, images, prompts, targets)
        select, mask = answer_positions(batch.target_lengths, batch.inputs["input_ids"].shape[1])
        labels = batch.inputs["input_ids"].gather(1, select + 1)  # the token each selected position predicts
        edit_of_row = [j for _ in range(len(ROLES) + len(partners)) for j in range(b)]  # partner rows: record j's edit
        stacked = stack_signals(signals, edit_of_row + same)  # same-image rows: their own record's edit
        n_loc = len(loc_records)
        group = ["rel"] * b + ["t_gen"] * b + ["m_gen"] * b + ["loc"] * n_loc + ["same_image"] * len(same)
        units = self._units(group, mask, b, n_loc)
        if 0 < config.rows_per_backward < len(shown):
            return self._step_in_parts(step, indices, own, batch, select, labels, mask, stacked, signals, roles,
                                       influence, pre_loc, pre_same, group, units)
        site = self.split.prefix(batch.inputs)
        editor.hook.signal = stacked
        try:
            logits = self.split.top(site, editor.hook.apply, select)
        finally:
            editor.restore()
        logp = torch.log_softmax(logits.float(), -1)  # [(4 + loc_partners)·b, K, V]
        device = logp.device
        labels, mask = labels.to(device), mask.to(device)
        part = {role: slice(r * b, (r + 1) * b) for r, role in enumerate(ROLES)}
        terms = {role: losses.target_nll(logp[part[role]], labels[part[role]], mask[part[role]])
                 for role in ALIGN_ROLES}  # rel, t_gen, m_gen: NLL of alt
        loc = slice(part["m_loc"].start, part["m_loc"].start + len(loc_records))  # own M-Loc rows, then partners'
        k_loc = logp.shape[1]
        pre = torch.stack([_pad_positions(p, k_loc) for p in pre_loc]).to(device)
        terms["loc"] = losses.locality_kl(pre, logp[loc], mask[loc])
        terms.update(self._im_terms(step, site, signals, roles, influence, own))
        if same:
            rows_same = slice(loc.stop, logp.shape[0])
            before = torch.stack([_pad_positions(p, k_loc) for p in pre_same]).to(device)
            terms["same_image"] = losses.locality_kl(before, logp[rows_same], mask[rows_same])
        if editor.adapter.scene is not None:
            terms["scene"] = self._scene_term(site, stacked, part["m_gen"], loc, units)
        terms = {name: value * _share(units, _UNIT[name]) for name, value in terms.items()}  # 1.0 alone
        total = (config.rel_weight * terms["rel"] + config.gen_weight * (terms["t_gen"] + terms["m_gen"])
                 + config.loc_weight * terms["loc"] + config.align_weight * terms["align"]
                 + config.up_weight * terms["up"] + config.down_weight * terms["down"])
        if same:
            total = total + config.same_image_weight * terms["same_image"]
        if editor.adapter.scene is not None:
            total = total + config.scene_weight * terms["scene"]
        self._check_losses(step, indices, total, terms)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self._optimizer_step(step, indices)
        return self._report({"loss": total, **terms})

    def _units(self, group: list[str], mask: torch.Tensor, b: int, n_loc: int) -> dict[str, tuple[float, float]]:
        """Per unit a loss term averages over, (this process's count, every process's): the real target
        tokens of each row group, the records (IM terms, the scene term's open half) and the locality rows
        (its shut half). A term's share of the global batch's mean is its local mean × local / global."""
        names = ["rel", "t_gen", "m_gen", "loc", "same_image"]
        tokens = [mask[torch.tensor([g == name for g in group], dtype=torch.bool)].sum().float() for name in names]
        local = torch.stack([*tokens, torch.tensor(float(b)), torch.tensor(float(n_loc))])
        total = sum_(local)
        keys = [*names, "records", "loc_rows"]
        return {name: (mine, every) for name, mine, every in zip(keys, local.tolist(), total.tolist())}

    def _report(self, values: dict) -> dict[str, float]:
        """The step's losses as floats, summed over the processes (each holds its share of the global mean)."""
        stacked = torch.stack([torch.as_tensor(v).detach().double().cpu().reshape(()) for v in values.values()])
        return dict(zip(values, sum_(stacked).tolist()))

    def _where(self, step: int, indices: list[int]) -> str:
        """"step S, batch of records [i, ...]" (record indices in their files) for an error message."""
        return f"step {step}, batch of records {[self.records[i].index for i in indices]}"

    def _check_losses(self, step: int, indices: list[int], total: torch.Tensor, terms: dict) -> None:
        """Raise `TrainingDiverged` naming the first non-finite term when ``total`` is not finite (one
        device sync per step; checked before any gradient reaches the weights)."""
        if bool(torch.isfinite(torch.as_tensor(total))):
            return
        values = {name: float(torch.as_tensor(value).detach()) for name, value in terms.items()}
        bad = next(((name, value) for name, value in values.items() if not math.isfinite(value)),
                   ("loss", float(torch.as_tensor(total).detach())))
        raise TrainingDiverged(f"{self._where(step, indices)}: loss term {bad[0]!r} is {bad[1]}; stopped before "
                               f"the optimizer step")

    def _optimizer_step(self, step: int, indices: list[int]) -> None:
        """The optimizer step, refused when a gradient is not finite, and checked to leave finite weights."""
        named = [(name, p) for name, p in self.editor.adapter.named_parameters() if p.requires_grad]
        if self.procs.several:
            sum_gradients([p for _, p in named])
        grads = [(name, p.grad) for name, p in named if p.grad is not None]
        if grads and not bool(torch.stack([g.isfinite().all() for _, g in grads]).all()):
            name = next(name for name, g in grads if not bool(g.isfinite().all()))
            raise TrainingDiverged(f"{self._where(step, indices)}: the gradient of adapter weight {name!r} is not "
                                   f"finite (the losses are); stopped before the optimizer step")
        self.optimizer.step()
        if not bool(torch.stack([p.isfinite().all() for _, p in named]).all()):
            name = next(name for name, p in named if not bool(p.isfinite().all()))
            raise TrainingDiverged(f"{self._where(step, indices)}: the optimizer step made adapter weight {name!r} "
                                   f"non-finite (the losses and gradients were finite: lower the learning rate)")

    def _step_in_parts(self, step: int, indices: list[int], own: slice, batch, select: torch.Tensor,
                       labels: torch.Tensor, mask: torch.Tensor, stacked, signals: list, roles: torch.Tensor,
                       influence: torch.Tensor, pre_loc: list[torch.Tensor], pre_same: list[torch.Tensor],
                       group: list[str], units: dict[str, tuple[float, float]]) -> dict[str, float]:
        """`step` with the layers above the edit site run on ``rows_per_backward`` rows at a time, each part's
        share of the loss back-propagated before the next part runs, so the autograd graph of one part is in
        memory at once (the gradient equals the one-pass step's up to float summation order). The IM and scene
        terms need no backbone layer and run once, on the parts' sites put together."""
        config, editor = self.config, self.editor
        b, n_rows = len(signals), select.shape[0]
        n_loc, n_same = len(pre_loc), len(pre_same)
        weight = {"rel": config.rel_weight, "t_gen": config.gen_weight, "m_gen": config.gen_weight,
                  "loc": config.loc_weight}
        if n_same:
            weight["same_image"] = config.same_image_weight
        rows_of = {name: torch.tensor([g == name for g in group]) for name in weight}
        count = {name: max(units[name][1], 1.0) for name in weight}  # each term's denominator: the global batch's
        pre = torch.stack([_pad_positions(p, select.shape[1]) for p in [*pre_loc, *pre_same]])  # rows 3b onwards
        self.optimizer.zero_grad(set_to_none=True)
        terms = dict.fromkeys(weight, 0.0)
        sites = []
        for lo in range(0, n_rows, config.rows_per_backward):
            hi = min(n_rows, lo + config.rows_per_backward)
            site = self.split.prefix({k: v[lo:hi] for k, v in batch.inputs.items()})
            sites.append(site)
            editor.hook.signal = stacked.rows(lo, hi)
            try:
                logp = torch.log_softmax(self.split.top(site, editor.hook.apply, select[lo:hi]).float(), -1)
            finally:
                editor.restore()
            part_labels, part_mask = labels[lo:hi].to(logp.device), mask[lo:hi].to(logp.device).float()
            part_loss = 0.0
            for name in weight:
                in_part = rows_of[name][lo:hi].to(logp.device)
                if not in_part.any():
                    continue
                if name in ("loc", "same_image"):  # KL(p_pre ‖ p_post), as losses.locality_kl
                    before = pre[[r - 3 * b for r in range(lo, hi) if group[r] == name]].to(logp.device)
                    kl = (before.exp() * (before - logp[in_part])).sum(-1)
                    value = (kl * part_mask[in_part]).sum() / count[name]
                else:  # the target NLL, as losses.target_nll
                    picked = logp[in_part].gather(-1, part_labels[in_part].unsqueeze(-1)).squeeze(-1)
                    value = -(picked * part_mask[in_part]).sum() / count[name]
                terms[name] += value.item()
                part_loss = part_loss + weight[name] * value
            self._check_losses(step, indices, part_loss, terms)
            part_loss.backward()
        site = EditSite(torch.cat([s.hidden for s in sites]), torch.cat([s.positions for s in sites]),
                        sites[0].layer_kwargs)
        extra = self._im_terms(step, site, signals, roles, influence, own)
        if editor.adapter.scene is not None:
            extra["scene"] = self._scene_term(site, stacked, slice(2 * b, 3 * b), slice(3 * b, 3 * b + n_loc), units)
        extra = {name: value * _share(units, _UNIT[name]) for name, value in extra.items()}
        rest = (config.align_weight * extra["align"] + config.up_weight * extra["up"]
                + config.down_weight * extra["down"])
        if editor.adapter.scene is not None:
            rest = rest + config.scene_weight * extra["scene"]
        self._check_losses(step, indices, rest, extra)
        rest.backward()
        self._optimizer_step(step, indices)
        terms.update({name: value.item() for name, value in extra.items()})
        total = (config.rel_weight * terms["rel"] + config.gen_weight * (terms["t_gen"] + terms["m_gen"])
                 + config.loc_weight * terms["loc"] + config.same_image_weight * terms.get("same_image", 0.0)
                 + rest.item())
        return self._report({"loss": total, **terms})

    def im_roles(self, step: int, b: int) -> torch.Tensor:
        """[b] the sample (index into ALIGN_ROLES) each record's IM terms use at ``step``."""
        return torch.randint(len(ALIGN_ROLES), (b,), generator=noise_generator(self.config.seed, _STEP_STREAM, step))

    def _scene_term(self, site: EditSite, signal, same: slice, unrelated: slice,
                    units: dict[str, tuple[float, float]]) -> torch.Tensor:
        """The scene gate's logistic loss: open on rows ``same`` (the edits' re-rendered images), shut on
        rows ``unrelated`` (M-Loc inputs); ``signal`` holds one edit per row. Each half is this process's
        share of its global mean (records, locality rows), so the term is left unscaled afterwards."""
        logits = self.editor.adapter.scene_logits(site.visual_states(), signal).float()
        return 0.5 * (losses.im_up(logits[same]) * _share(units, "records")
                      + losses.im_down(logits[unrelated]) * _share(units, "loc_rows"))

    def _im_terms(self, step: int, site: EditSite, signals: list, roles: torch.Tensor, influence: torch.Tensor,
                  own: slice) -> dict[str, torch.Tensor]:
        """IM alignment / up / down on the drawn rel-or-gen row per record and ``im_tokens`` drawn tokens
        (drawn for the whole global batch; this process takes its records' rows ``own``)."""
        generator = noise_generator(self.config.seed, _TOKEN_STREAM, step)
        adapter = self.editor.adapter
        dtype = adapter.vead.begin.weight.dtype
        n_visual = site.positions.shape[1]
        tokens = torch.stack([torch.randperm(n_visual, generator=generator)[:min(self.config.im_tokens, n_visual)]
                              for _ in range(self.config.batch_size)])[own]
        shown, unrelated, targets = im_inputs(site, influence, roles, tokens)
        query = torch.cat([s.query for s in signals]).to(shown.device, dtype)
        rg_logits = adapter.im(shown.to(dtype), query).float()  # [b, k]
        loc_logits = adapter.im(unrelated.to(dtype), query).float()
        targets = targets.to(rg_logits.device)
        up = losses.im_up(rg_logits, targets if self.config.im_up == "influence" else None)
        return {"align": losses.im_alignment(rg_logits, targets), "up": up, "down": losses.im_down(loc_logits)}


def im_inputs(site: EditSite, influence: torch.Tensor, roles: torch.Tensor, tokens: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the IM terms compare, for a role-major batch of b records (rows ``ROLES.index(role) * b + j``).

    influence [b, P]: each record's token influence of its drawn sample; roles [b]: the drawn sample per
    record (index into ALIGN_ROLES); tokens [b, k]: drawn visual-token indices. Returns the drawn tokens'
    edit-site states of the drawn row [b, k, d] and of the m_loc row [b, k, d], and the alignment targets [b, k]:
    the drawn row's OWN influence at those tokens, normalised to sum 1 (the official slice bug took
    image-rephrase targets from the reliability image).
    """
    b = len(roles)
    device = site.hidden.device
    chosen = roles * b + torch.arange(b)
    loc_rows = ROLES.index("m_loc") * b + torch.arange(b)

    def states(rows: torch.Tensor) -> torch.Tensor:
        positions = site.positions[rows[:, None].to(site.positions.device), tokens.to(site.positions.device)]
        return site.hidden[rows[:, None].to(device), positions.to(device)]

    picked = influence.gather(1, tokens).clamp(min=0)  # [b, k]
    targets = picked / picked.sum(-1, keepdim=True).clamp(min=1e-12)
    return states(chosen), states(loc_rows), targets


# The unit each loss term averages over (`Trainer._units`); the scene term scales its halves itself.
_UNIT = {"rel": "rel", "t_gen": "t_gen", "m_gen": "m_gen", "loc": "loc", "same_image": "same_image",
         "align": "records", "up": "records", "down": "records", "scene": None}


def _share(units: dict[str, tuple[float, float]], unit: str | None) -> float:
    """This process's share of the global batch in ``unit`` (1.0 for a process alone, exactly)."""
    if unit is None:
        return 1.0
    local, total = units[unit]
    return local / total if total else 0.0


def _pad_positions(logp: torch.Tensor, k: int) -> torch.Tensor:
    """[n, V] → [k, V], repeating the last row (masked out by the caller)."""
    return logp if logp.shape[0] == k else torch.cat([logp, logp[-1:].expand(k - logp.shape[0], -1)])
