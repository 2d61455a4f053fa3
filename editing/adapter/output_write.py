"""The output write: a second, per-edit write on the output side, for targets the adapter cannot reach.

Why: VEAD rewrites visual-token states at the LM's input side. On the toy defaults that moves the answer
to any word the LM has produced in training, but never to a word it never produced ("novel" targets: a
colour, shape or number word outside its training answers). Fitting one edit's VEAD values by gradient at
edit time lifts such a word to probability 0.001–0.003 at best, with the output spreading towards uniform
instead (docs/experiments/editing-compare.md). A write after the last layer reaches any word: the logits
are ``W h`` (``W`` the LM head), so adding ``δ`` to the head's input ``h`` adds ``W δ`` to the logits.

What is stored per edit (`fit_output_write`), from one teacher-forced forward of the edit sample
``template(prompt) + " " + target`` under this edit alone (adapter on, no output write; with ``fit_on``
"unedited", the adapter shut), K = its target tokens:
- ``triggers`` [K]: the input token at each position that predicts a target token (the last prompt token,
  then target tokens 1..K−1): position t predicts token t+1, so that is where target token k is written;
- ``keys`` [K, d]: the head's input at those positions, unit length;
- ``history`` [K, C] (with ``context`` C > 0): the C tokens before each trigger, nearest first (−1 before the
  sequence's start);
- ``deltas`` [K, d]: per position, the smallest change Adam finds (``lr``, at most ``steps``) that gives the
  target token a logit ``margin`` over every other token there (``reached`` False where the steps ran out
  first: Adam moves each coordinate about ``lr`` a step); a position already at the margin under
  the adapter gets no write (zero row), so a target the adapter already reaches is left to the adapter.
  Fitted on the unedited state instead, every position the unedited model does not already give the
  target gets a write, so a rephrase the adapter misses is still written where the write fires.

Where it is applied (`OutputWrites.apply`, a forward pre-hook on the LM head run by `AdapterHook`): in
an input row that the edit bank routed to the edit with a routing weight of at least ``min_weight``, at
every position whose input token is trigger k and whose head input has cosine ≥ ``tau`` with key k, δ_k
is added — of several matching keys (a target that repeats a token), only one: with ``context`` C > 0, the
one whose history agrees with the tokens before the position for the longest run (up to C), and of those
the closest; with C = 0, the closest. The cosine alone can pick the wrong occurrence: on a rephrased
instruction every state of the caption shifts, while the tokens before a position are the target's own
under teacher forcing and under greedy generation that has followed the target so far. The routing
decides *which image* (the bank's scene router and gate), the key decides *which
question*: the positions of a same-image question about something else end on the same last prompt token
but hold another state, and are left alone. Where the question gate (`editing.adapter.question_gate`) is
on, it already leaves such rows untouched, and the comparison's ``visedit_gated`` drops the key check
(``tau`` None): the key then only turned rephrases away (docs/experiments/editing-compare.md). Positions
in the prompt that happen to hold a trigger token change only the logits predicting the prompt's own next
token, which no answer reads.

Greedy generation with the KV cache writes token by token: the routing of the prompt's forward is kept
for the single-token steps that follow (`AdapterHook`), each new token is the trigger of the next, and the
hook keeps the tokens seen so far, so a single-token step still has the tokens before it.

Rows the routing leaves out, text-only inputs and an empty bank pass the head bit for bit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class OutputWriteConfig:
    """How output writes are fitted and when they fire (module docstring). tau None: no key check (any
    position with the trigger token, in a routed row). margin 10 and tau 0.7: chosen on the three
    defaults' dev edits (docs/experiments/editing-compare.md, "An output write")."""

    margin: float = 10.0
    tau: float | None = 0.7
    min_weight: float = 0.5
    steps: int = 200
    lr: float = 0.05
    fit_on: str = "adapter"  # the state the write is fitted on: the edit sample under its edit, or "unedited"
    context: int = 0  # tokens before a repeated trigger that choose among its keys (0: the closest key)

    def __post_init__(self):
        if self.margin <= 0 or self.steps < 0 or self.lr <= 0 or not 0 <= self.min_weight <= 1 or self.context < 0:
            raise ValueError(f"output write config out of range: {self}")
        if self.fit_on not in ("adapter", "unedited"):
            raise ValueError(f"output write fit_on must be 'adapter' or 'unedited', got {self.fit_on!r}")
        if self.tau is not None and not -1 <= self.tau <= 1:
            raise ValueError(f"output write tau {self.tau} is not a cosine in [-1, 1]")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hyper(cls, table: dict | None) -> "OutputWriteConfig | None":
        """From a method config's ``output_write`` mapping; None (or false) turns the write off."""
        if not table:
            return None
        if not isinstance(table, dict):
            raise ValueError(f"output_write must be a mapping of {', '.join(cls().to_json())}, got {table!r}")
        unknown = set(table) - set(cls().to_json())
        if unknown:
            raise ValueError(f"output_write: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(**table)


@dataclass
class OutputWrite:
    """One edit's output write: ``triggers`` [K] token ids, ``keys`` [K, d] unit vectors, ``deltas``
    [K, d] (zero rows write nothing); ``steps`` the Adam steps its fit took; ``reached`` whether every
    position leads by the margin on the edit sample (False: the fit ran out of steps short of it);
    ``history`` [K, C] the tokens before each trigger, nearest first, −1 past the start (None: C = 0)."""

    triggers: torch.Tensor
    keys: torch.Tensor
    deltas: torch.Tensor
    steps: int = 0
    reached: bool = True
    history: torch.Tensor | None = None

    @property
    def writes(self) -> bool:
        """Whether any position has a nonzero delta."""
        return bool(self.deltas.abs().sum() > 0)


def margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[K] each row's target logit minus the largest other logit (logits [K, V], targets [K])."""
    own = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf")).amax(1)
    return own - others


def histories(ids: torch.Tensor, start: int, n: int, context: int, pad: int = -1) -> torch.Tensor:
    """[..., n, context] the ``context`` tokens before each of positions start..start+n−1 of ``ids`` [..., S],
    nearest first; ``pad`` where a position is fewer than ``context`` tokens from the start."""
    padded = torch.cat([ids.new_full((*ids.shape[:-1], context), pad), ids], dim=-1)
    back = torch.arange(context, device=ids.device)
    offsets = torch.arange(n, device=ids.device)[:, None] + start + context - 1 - back
    return padded[..., offsets]


def fit_output_write(head_inputs: torch.Tensor, targets: torch.Tensor, triggers: torch.Tensor,
                     head_weight: torch.Tensor, head_bias: torch.Tensor | None,
                     config: OutputWriteConfig, history: torch.Tensor | None = None) -> OutputWrite:
    """The output write of one edit (module docstring). head_inputs [K, d]: the LM head's input at the
    positions predicting the K target tokens; head_weight [V, d] and head_bias [V] (or None): the head;
    history [K, C]: the tokens before each trigger (`histories`), kept with the write when C > 0."""
    weight = head_weight.detach().float()
    base = head_inputs.detach().float() @ weight.T
    if head_bias is not None:
        base = base + head_bias.detach().float()
    delta = torch.zeros_like(head_inputs, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=config.lr)
    steps = 0
    with torch.enable_grad():
        for steps in range(config.steps + 1):
            gap = margins(base + delta @ weight.T, targets)
            reached = bool((gap >= config.margin).all())
            if steps == config.steps or reached:
                break
            # hinge half a logit past the margin, so the stop rule is met by a little room, not exactly
            loss = F.relu(config.margin + 0.5 - gap).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    deltas = delta.detach()
    # a position at the margin under the adapter alone is not written (its row stays exactly zero)
    untouched = margins(base, targets) >= config.margin
    deltas[untouched] = 0
    return OutputWrite(triggers.detach().clone(), F.normalize(head_inputs.detach().float(), dim=-1), deltas, steps,
                       reached, None if history is None or not history.shape[-1] else history.detach().clone())


class OutputWrites:
    """The output writes of the edits a bank holds, index-aligned with its signals (None: no write)."""

    def __init__(self):
        self.items: list[OutputWrite | None] = []
        self._writing = 0  # how many items write anything: kept by count, read on every forward
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def __len__(self) -> int:
        """The number of held edits whose write changes anything."""
        return self._writing

    def append(self, write: OutputWrite | None) -> None:
        self.items.append(None)
        self.set(len(self.items) - 1, write)

    def set(self, index: int, write: OutputWrite | None) -> None:
        old = self.items[index]
        self._writing += (write is not None and write.writes) - (old is not None and old.writes)
        self.items[index] = write
        self._stacked = None

    def clear(self) -> None:
        self.items.clear()
        self._writing = 0
        self._stacked = None

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(triggers [N, K], keys [N, K, d], deltas [N, K, d], history [N, K, C] or None when no write keeps
        one); padding and positions without a write (zero delta) get trigger −1, which no input token
        matches, so `apply` need not look at the deltas; missing history is −1 too."""
        if self._stacked is None:
            real = [w for w in self.items if w is not None]
            k = max(len(w.triggers) for w in real)
            d = real[0].deltas.shape[1]
            c = max((w.history.shape[1] for w in real if w.history is not None), default=0)
            n = len(self.items)
            triggers = torch.full((n, k), -1, dtype=torch.long)
            keys, deltas = torch.zeros(n, k, d), torch.zeros(n, k, d)
            history = torch.full((n, k, c), -1, dtype=torch.long) if c else None
            for i, w in enumerate(self.items):
                if w is not None:
                    triggers[i, :len(w.triggers)] = w.triggers.cpu()
                    keys[i, :len(w.triggers)] = w.keys.cpu()
                    deltas[i, :len(w.triggers)] = w.deltas.cpu()
                    if history is not None and w.history is not None:
                        history[i, :len(w.triggers), :w.history.shape[1]] = w.history.cpu()
            triggers[deltas.abs().sum(-1) == 0] = -1
            self._stacked = (triggers, keys, deltas, history)
        return self._stacked

    def apply(self, hidden: torch.Tensor, input_ids: torch.Tensor, routed: torch.Tensor, fire: torch.Tensor,
              tau: float | None) -> torch.Tensor:
        """``hidden`` [B, T, d] (the LM head's input) with each firing row's routed edit written where its
        trigger tokens are (and, with ``tau``, its keys match); ``hidden`` itself when nothing is written.
        input_ids [B, S ≥ T]: the tokens up to these positions, whose last T are the ones ``hidden`` holds
        (the earlier ones are the history of repeated triggers); routed [B] the edit index of each row;
        fire [B] whether the row may be written."""
        if not len(self) or not bool(fire.any()):
            return hidden
        triggers, keys, deltas, history = (None if t is None else t.to(hidden.device) for t in self.stacked())
        routed = routed.to(hidden.device)
        triggers, keys, deltas = triggers[routed], keys[routed], deltas[routed]  # [B, K], [B, K, d] x2
        fire = fire.to(hidden.device)[:, None, None]
        ids = input_ids.to(hidden.device)
        length = hidden.shape[1]
        match = (ids[:, -length:, None] == triggers[:, None, :]) & fire
        if not bool(match.any()):
            return hidden
        several = bool((match.sum(-1) > 1).any())  # a target that repeats a token ("a", "the" in captions)
        if tau is not None or several:
            cosines = torch.einsum("btd,bkd->btk", F.normalize(hidden.float(), dim=-1), keys)
            if tau is not None:
                match &= cosines >= tau
            if several:  # each position takes one matching key's write: the longest agreeing history, then closest
                score = cosines
                if history is not None:
                    before = histories(ids, ids.shape[1] - length, length, history.shape[-1], pad=-2)  # [B, T, C]
                    same = before[:, :, None, :] == history[routed][:, None, :, :]  # [B, T, K, C]
                    agree = same.long().cumprod(-1).sum(-1)  # the run of equal tokens, nearest first
                    score = cosines + 3.0 * agree  # a cosine spans 2: one more agreeing token always wins
                best = score.masked_fill(~match, float("-inf")).argmax(-1, keepdim=True)
                match &= torch.zeros_like(match).scatter_(-1, best, True)
        if not bool(match.any()):
            return hidden
        added = torch.einsum("btk,bkd->btd", match.float(), deltas)
        return torch.where(match.any(-1, keepdim=True), hidden + added.to(hidden.dtype), hidden)
