"""decoding.py: the fast greedy decoder the agents' rollouts run, token-equal to model.generate.

model.py's `generate` is the plain version: one KV cache for the batch, every row until the last one stops.
This file's `generate` has the same signature and gives the same tokens (tests/test_decoding.py checks it on
batches with stops, the prompt cache and prompt lookup), faster:

  - PromptCache     keys/values of earlier prompts reused across calls (LRU, bounded in tokens): the next turn
                    of a conversation prefills only its new tokens; `prefill_chunk` makes what is cached
                    independent of what the cache held (deterministic decoding)
  - prompt lookup   a lone row verifies draft tokens copied from its own context (agents copy names and code),
                    several tokens per pass over the weights
  - rows leave      finished rows leave the batch, so a long answer does not make the short ones pay
  - layouts         `lay_out_for_decoding` stores the weights the way CPU one-row products read them fastest;
                    `project` splits short products over the threads, `project_together` reads q k v (and
                    gate up) in one product
  - adapters        one base, one unmerged LoRA adapter per batch row (`route_rows`): one batch serves several roles
  - batch-invariant `generate_invariant` decodes many prompts together, each to the bits it gets alone: every
                    product of a step on pieces of one fixed row count, attention on each row's own cache

It runs model.Transformer's parameters through its own forward (`hidden`), which reuses the core's attention
(`Attention.attend`) and KVCache. It imports model.py and lora.py; the core never imports it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from lora import LoRALinear, adapter_names, lora_layers
from model import Generation, KVCache, Tokenizer, Transformer, check_prompts, finish, rope_cos_sin, stop_reason

# ----------------------------------------------------------------------------------------------------------------
# 1. The prompt cache and prompt-lookup drafts
# ----------------------------------------------------------------------------------------------------------------

class PromptCache:
    """Keys/values of recent prompts, reused by later `generate` calls: a prompt's longest stored prefix is
    copied instead of recomputed, so the next turn of a conversation prefills only its new tokens, and
    conversations that start alike (same system prompt and task) share their first tokens.

    Entries are keyed by a namespace (keys/values depend on the weights: rollout.py uses the adapter name) and
    their token ids. At most `max_tokens` tokens are kept in all; the least recently used entries go first.
    """

    def __init__(self, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"the prompt cache needs a positive token budget, got {max_tokens}")
        self.max_tokens = max_tokens
        self.tokens = 0  # tokens held, summed over entries
        # (namespace, ids) -> (keys, values): one (Hkv, n, d) tensor per layer each; order = least recent first
        self.entries: OrderedDict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0

    def lookup(self, namespace, ids: list[int], limit: int) -> tuple[int, tuple | None]:
        """(n, key): the longest stored prefix of `ids` in `namespace`, at most `limit` tokens (0, None: none)."""
        best, best_key = 0, None
        for key in self.entries:
            if key[0] == namespace:
                n = _common_prefix(key[1], ids, limit)
                if n > best:
                    best, best_key = n, key
        if best_key is not None:
            self.entries.move_to_end(best_key)
        return best, best_key

    def store(self, namespace, ids: tuple[int, ...], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Keep keys/values (per layer (Hkv, n, d)) of the tokens `ids`; entries they extend are dropped."""
        n = len(ids)
        if n == 0 or n > self.max_tokens:
            return
        for key in [key for key in self.entries if key[0] == namespace]:
            other = key[1]
            if len(other) >= n and other[:n] == ids:  # already held: an entry of which ids are a prefix
                self.entries.move_to_end(key)
                return
            if ids[:len(other)] == other:  # superseded: every lookup it would serve, the new entry serves
                self.tokens -= len(other)
                del self.entries[key]
        self.entries[(namespace, ids)] = (k, v)
        self.tokens += n
        while self.tokens > self.max_tokens:
            (_, old), _ = self.entries.popitem(last=False)
            self.tokens -= len(old)


def _common_prefix(a, b, limit: int) -> int:
    """Length of the longest common prefix of sequences a and b, at most `limit` (slice compares run in C)."""
    lo, hi = 0, min(len(a), len(b), limit)
    if tuple(a[:hi]) == tuple(b[:hi]):
        return hi
    while lo < hi - 1:  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if tuple(a[:mid]) == tuple(b[:mid]):
            lo = mid
        else:
            hi = mid
    return lo


class NgramIndex:
    """Where each 3-gram and 2-gram of a token sequence last occurred, for prompt-lookup drafts: the tokens that
    followed the latest earlier occurrence of the sequence's last n tokens are a likely continuation (agents copy
    names, code and values from their prompt)."""

    def __init__(self, tokens: list[int]):
        self.tokens: list[int] = []
        self.after: dict[tuple, int] = {}  # n-gram -> index of the token that followed its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            end = len(self.tokens)  # the n-grams ending at the current last token are followed by t
            for n in (2, 3):
                if end >= n:
                    self.after[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the last 3 (else 2) tokens."""
        for n in (3, 2):
            start = self.after.get(tuple(self.tokens[-n:])) if k > 0 and len(self.tokens) > n else None
            if start is not None:
                return self.tokens[start:start + k]
        return []


# ----------------------------------------------------------------------------------------------------------------
# 2. Decoding layouts and products
# ----------------------------------------------------------------------------------------------------------------

SPLIT_ROWS = 64  # products of at most this many rows (decode steps, prefill chunks) are split across threads


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, x (..., in), weight (out, in): the product every projection runs here.

    A weight in the decoding layout (`lay_out_for_decoding`: (in, out) storage) multiplied by a few rows is
    split along `in` into one block per thread and run as one batched product whose blocks torch spreads over
    the threads; MKL would run a one-row product on a single core, and decoding is bound by how fast the
    weights stream in. The block partial sums are added, so the rounding depends on the thread count, not on
    the batch."""
    rows = x.numel() // x.shape[-1]
    if rows > SPLIT_ROWS or weight.stride() != (1, weight.shape[0]):
        return F.linear(x, weight, bias)
    n = torch.get_num_threads()
    if n == 1 or weight.shape[1] % n:
        return F.linear(x, weight, bias)
    blocks = x.reshape(rows, n, -1).transpose(0, 1)  # (n, rows, in/n)
    y = torch.bmm(blocks, weight.t().view(n, -1, weight.shape[0])).sum(0)  # (rows, out)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class SplitLinear(nn.Linear):
    """nn.Linear (same parameters and keys) whose product is `project`: the vocabulary projection of a model laid
    out for decoding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)


def project_together(x: torch.Tensor, routes, *layers: nn.Module) -> list[torch.Tensor]:
    """Each layer's projection of the same input x (q, k and v; gate and up; or one layer), plus the LoRA updates
    it runs (`add_adapters`). Where the layers' weights sit side by side in one (in, out1 + out2 + ...) block
    (`lay_out_for_decoding`), one product reads them all: fewer and longer weight streams."""
    joint = joint_weight(layers) if len(layers) > 1 else None
    if joint is None:
        return [add_adapters(layer, x, project(x, layer.weight, layer.bias), routes) for layer in layers]
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    y, start, out = project(x, joint, bias), 0, []  # y: (..., out1 + out2 + ...)
    for layer in layers:
        share = y.narrow(-1, start, layer.weight.shape[0])  # (..., out_i), a view
        out.append(add_adapters(layer, x, share, routes))
        start += share.shape[-1]
    return out


def joint_weight(layers) -> torch.Tensor | None:
    """The layers' weights as one (out1 + out2 + ...) x in tensor if they are consecutive column blocks of one
    (in, out1 + out2 + ...) storage, in order (`lay_out_for_decoding`); else None."""
    weights = [layer.weight for layer in layers]
    total, address = sum(w.shape[0] for w in weights), weights[0].data_ptr()
    for w in weights:
        # each block starts where the previous one's columns end: inside the first block's span, so one storage
        if w.stride() != (1, total) or w.data_ptr() != address:
            return None
        address += w.shape[0] * w.element_size()
    return weights[0].as_strided((total, weights[0].shape[1]), (1, total))  # (out, in) over (in, out) storage


def lay_out_for_decoding(model: Transformer) -> Transformer:
    """Store the projection weights the way one-row products read them fastest; returns the model.

    For fp32 weights on a CPU, where greedy decoding is a stream of one-row products bound by reading the
    weights. Each (out, in) weight keeps its shape but is stored transposed, as an (in, out) block, which MKL
    reads faster. The blocks of projections of one input sit side by side, q k v and gate up, so that
    `project_together` reads them in one product, and `project` splits products of up to SPLIT_ROWS rows over
    the threads. bf16 weights and GPUs keep their layout (docs/performance.md). Names, shapes and values do not
    change (sums may round differently), and model.Transformer's own forward still runs on them; the embedding
    tied to the vocabulary projection is then read across columns. For inference only: training never calls it.
    Joined weights are new Parameters (the old ones may be shared with another model, as `lora.merged_copy`
    shares them); a second call changes nothing."""
    for layers in joined_projections(model):
        if all(_cpu_fp32(layer.weight) for layer in layers) and joint_weight(layers) is None:
            joint = torch.cat([layer.weight.detach().t() for layer in layers], dim=1)  # (in, out1 + out2 + ...)
            columns = joint.split([layer.weight.shape[0] for layer in layers], dim=1)
            for layer, w in zip(layers, columns):
                layer.weight = nn.Parameter(w.t(), requires_grad=layer.weight.requires_grad)  # (out, in) view
    if type(model.lm_head) is nn.Linear:
        model.lm_head.__class__ = SplitLinear  # the same module (parameters, hooks), its product `project`
    for module in model.modules():  # the rest: o_proj, down_proj, lm_head (and the embedding tied to it)
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding) or w is None or w.dim() != 2:
            continue
        if _cpu_fp32(w) and w.stride(0) != 1:  # stored (out, in), not yet (in, out)
            w.data = w.data.t().contiguous().t()  # in place: every model sharing it gets the layout
    return model


def joined_projections(model: Transformer) -> list[tuple[nn.Module, ...]]:
    """Per layer, the projections of one input that the decoding layout joins: (q, k, v) and (gate, up)."""
    return [group for block in model.model.layers for group in (
        (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj),
        (block.mlp.gate_proj, block.mlp.up_proj))]


def _cpu_fp32(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# 3. One adapter per batch row
# ----------------------------------------------------------------------------------------------------------------

def route_rows(model: nn.Module, names: list[str | None]) -> dict[str, slice | torch.Tensor]:
    """The routes that run adapter names[i] on batch row i (None: the plain base on that row), for `hidden`:
    adapter name -> its rows, a slice when they are consecutive (callers that sort their batch by adapter get
    only slices: no gathers), else an index tensor. The base matmuls are shared by every row and only the
    low-rank updates differ. Adapters must not be merged: a merged one would apply to every row."""
    layers = list(lora_layers(model).values())
    if any(layer.merged is not None for layer in layers):
        raise ValueError("route_rows needs unmerged adapters; call unmerge(model) first")
    unknown = set(names) - {None} - {name for layer in layers for name in layer.specs}
    if unknown:
        raise ValueError(f"no adapter named {unknown.pop()!r} on the model; adapters: {adapter_names(model)}")
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None:
            rows.setdefault(name, []).append(i)
    device = next(model.parameters()).device
    return {name: slice(r[0], r[-1] + 1) if r[-1] - r[0] == len(r) - 1 else torch.tensor(r, device=device)
            for name, r in rows.items()}


def add_adapters(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, routes) -> torch.Tensor:
    """y += the LoRA update that `layer` runs on x, in place; returns y. Without routes: its active unmerged
    adapter (LoRALinear.forward's), on every row; with routes (`route_rows`): each routed adapter on its rows."""
    if not isinstance(layer, LoRALinear) or layer.merged is not None:
        return y
    if routes is None:
        return y if layer.active is None else layer.add_update(x, y, layer.active)
    for name, rows in routes.items():  # x: (B, ...)
        if name not in layer.specs:
            continue
        if isinstance(rows, slice):  # consecutive rows: views, updated in place
            layer.add_update(x[rows], y[rows], name)
        else:
            y.index_copy_(0, rows, layer.add_update(x.index_select(0, rows), y.index_select(0, rows), name))
    return y


# ----------------------------------------------------------------------------------------------------------------
# 4. The forward and generate
# ----------------------------------------------------------------------------------------------------------------

def hidden(model: Transformer, input_ids: torch.Tensor, cache: KVCache, routes=None) -> torch.Tensor:
    """model.Transformer.hidden (B, T, D) of input_ids (B, T) continuing `cache`, on this file's products: the
    same parameters and the same attention (Attention.attend), each row running its routed adapter."""
    T = input_ids.shape[1]
    x = model.model.embed_tokens(input_ids)  # (B, T, D)
    positions, mask = cache.positions_and_mask(T, x.device)
    cos, sin = rope_cos_sin(model.inv_freq, positions, x.dtype)  # (B, 1, T, d)
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        q, k, v = project_together(block.input_layernorm(x), routes, attn.q_proj, attn.k_proj, attn.v_proj)
        x = x + project_together(attn.attend(q, k, v, cos, sin, mask, cache), routes, attn.o_proj)[0]
        gate, up = project_together(block.post_attention_layernorm(x), routes, mlp.gate_proj, mlp.up_proj)
        x = x + project_together(F.silu(gate) * up, routes, mlp.down_proj)[0]  # SwiGLU
    cache.length += T
    return model.model.norm(x)


def logits(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    """The vocabulary projection (..., V) of hidden states h (..., D), through the lm_head module (its hooks run)."""
    return model.lm_head(h)


def row_view(cache: KVCache, b: int) -> KVCache:
    """A one-row view of row b sharing the cache's storage (prefilling rows one at a time writes here)."""
    view = KVCache.__new__(KVCache)
    view.k, view.v = [k[b:b + 1] for k in cache.k], [v[b:b + 1] for v in cache.v]  # (1, Hkv, max_len, d) views
    view.pad, view.max_len, view.length = cache.pad[b:b + 1], cache.max_len, cache.length
    return view


def keep_rows(cache: KVCache, rows: torch.Tensor) -> None:
    """Keep only the given batch rows (B',) of the cache, e.g. to drop sequences that finished generating."""
    cache.k = [k[rows] for k in cache.k]
    cache.v = [v[rows] for v in cache.v]
    cache.pad = cache.pad[rows]


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(),
             tokenizer: Tokenizer | None = None, stop_strings=(), pad_id: int | None = None,
             prompt_cache: PromptCache | None = None, namespace=None,
             prefill_chunk: int | None = None, prompt_lookup: int = 0, adapters: list | None = None
             ) -> list[Generation]:
    """model.generate's greedy continuations (the same arguments first, the same tokens up to fp rounding), fast.

    Rows stop independently on a stop id, a stop string (needs `tokenizer`) or max_new_tokens, and leave the
    batch when they do. With `adapters` (one name or None per prompt; the model carries them unmerged, lora.py),
    each row runs its own adapter (`route_rows`): one batch serves several roles of one base.

    With a `prompt_cache`, each row starts from the keys/values of its longest cached prefix (in `namespace`)
    and only the rest of its prompt is computed; each row's prompt is stored once computed (the batch's later
    rows may share it), and finished rows store their prompt and new tokens for later calls (a row with an
    adapter in namespace (namespace, adapter)). With `prefill_chunk` C, prompts are
    computed in chunks of C tokens aligned at position 0 and only whole chunks are reused or stored: a chunk's
    keys/values are then the same bits whether they were cached or computed, so (at batch 1) the tokens depend
    on the prompt alone, not on what the cache held.

    With `prompt_lookup` k > 0, a row decoding alone (batch 1, or the last row of a batch) feeds up to k draft
    tokens copied from its own context after the latest earlier occurrence of its last 3 (or 2) tokens, and keeps
    the longest run of them the model itself predicts, plus its next token: greedy tokens are unchanged (up to fp
    rounding: a step then computes several positions at once), and every accepted draft token saves one pass over
    the weights, which bounds decoding at batch 1.
    """
    stops, stop_ids = check_prompts(prompts, stop_strings, tokenizer), set(stop_ids)
    if adapters is not None and len(adapters) != len(prompts):
        raise ValueError("generate needs one adapter name (or None) per prompt")
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer else 0)
    B, P = len(prompts), max(len(p) for p in prompts)
    # each row's prompt-cache namespace (keys/values depend on the weights that computed them) and adapters
    spaces = [namespace] * B if adapters is None else [(namespace, a) for a in adapters]
    routed, routes = None, None  # the adapter of each batch row of the last forward, and its routes

    def route(rows):  # the routes of a forward whose batch rows hold these prompts
        nonlocal routed, routes
        if adapters is not None and (names := [adapters[b] for b in rows]) != routed:
            routed, routes = names, route_rows(model, names)
        return routes

    pad = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,)
    cache = KVCache(model.config, B, P + max_new_tokens, device, dtype, pad)
    if prompt_cache is None and prefill_chunk is None:  # the whole batch's prompts in one pass
        ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)  # (B, P)
        h = hidden(model, ids, cache, route(range(B)))[:, -1]  # (B, D): only the last position is needed
        n_cached = [0] * B
    else:  # row by row, each from its own cached prefix
        rows = []
        for b in range(B):
            rows.append(_prefill_row(model, cache, b, prompts[b], prompt_cache, spaces[b], prefill_chunk, route))
            if prompt_cache is not None and b < B - 1:  # later rows may start alike (one system prompt)
                _store_row(prompt_cache, spaces[b], cache, b, prompts[b], len(prompts[b]), prefill_chunk)
        cache.length = P
        h, n_cached = torch.stack([r[0] for r in rows]), [r[1] for r in rows]  # (B, D)
    # per row, the tokens that can hold a stop string that was not there a step ago
    windows = [max((len(s) for s in row_stops), default=0) + 8 for row_stops in stops]

    new: list[list[int]] = [[] for _ in range(B)]
    texts: list[str | None] = [None] * B
    reasons: list[str | None] = [None] * B
    rows = list(range(B))  # prompt index of each batch row; finished prompts leave the batch
    steps = [[t] for t in logits(model, h).argmax(-1).tolist()]  # per batch row: its new tokens this step
    lookup = None  # the n-gram index of a lone row's tokens, for prompt-lookup drafts
    while True:
        _append_steps(rows, steps, new, reasons, texts, max_new_tokens, stop_ids, tokenizer, stops, windows)
        finished = [reasons[b] is not None or len(new[b]) == max_new_tokens for b in rows]
        if prompt_cache is not None:
            for i, b in enumerate(rows):
                if finished[i]:
                    _store_row(prompt_cache, spaces[b], cache, i, prompts[b] + new[b][:-1], len(prompts[b]),
                               prefill_chunk)
        keep = [i for i, done in enumerate(finished) if not done]
        if not keep:
            break
        if len(keep) < len(rows):
            keep_rows(cache, torch.tensor(keep, device=device))
            rows = [rows[i] for i in keep]
        if len(rows) == 1 and prompt_lookup:  # a lone row: verify a draft copied from its own context
            b = rows[0]
            lookup = lookup or NgramIndex(prompts[b])
            lookup.extend(new[b][len(lookup.tokens) - len(prompts[b]):])  # its tokens so far, the last included
            draft = lookup.draft(min(prompt_lookup, max_new_tokens - len(new[b]) - 1))
            fed = torch.tensor([[new[b][-1]] + draft], device=device)  # (1, 1 + len(draft))
            # the model's token after each fed one: (1 + len(draft),)
            predicted = logits(model, hidden(model, fed, cache, route(rows)))[0].argmax(-1).tolist()
            accepted = next((j for j, (d, t) in enumerate(zip(draft, predicted)) if d != t), len(draft))
            cache.length -= len(draft) - accepted  # slots of rejected draft tokens are overwritten later
            steps = [predicted[:accepted + 1]]
        else:
            last = torch.tensor([new[b][-1] for b in rows], device=device)[:, None]  # (rows, 1)
            steps = [[t] for t in logits(model, hidden(model, last, cache, route(rows))[:, -1]).argmax(-1).tolist()]
    return [finish(new[b], texts[b], reasons[b], len(prompts[b]), tokenizer, n_cached[b]) for b in range(B)]


def _prefill_row(model: Transformer, cache: KVCache, b: int, prompt: list[int], prompt_cache: PromptCache | None,
                 namespace, chunk: int | None, route) -> tuple[torch.Tensor, int]:
    """Fill row b's slots with its prompt (cached prefix copied, the rest computed); (last hidden (D,), cached)."""
    n, start = len(prompt), int(cache.pad[b])
    cached, key = prompt_cache.lookup(namespace, prompt, n - 1) if prompt_cache is not None else (0, None)
    if chunk:
        cached = cached // chunk * chunk
    if cached:
        k, v = prompt_cache.entries[key]
        for layer in range(len(cache.k)):
            cache.k[layer][b, :, start:start + cached] = k[layer][:, :cached]
            cache.v[layer][b, :, start:start + cached] = v[layer][:, :cached]
    row = row_view(cache, b)
    row.length = start + cached
    ids = torch.tensor(prompt, device=cache.pad.device)[None]  # (1, n)
    for s in range(cached, n, chunk or n):
        h = hidden(model, ids[:, s:s + (chunk or n)], row, route([b]))  # (1, T, D)
    return h[0, -1], cached


def _store_row(prompt_cache: PromptCache, namespace, cache: KVCache, i: int, fed: list[int], n_prompt: int,
               chunk: int | None) -> None:
    """Store batch row i's keys/values of the tokens it was fed (prompt + new tokens but the last); with
    chunked prefill only the prompt's whole chunks (decode steps compute keys/values differently)."""
    n = n_prompt // chunk * chunk if chunk else len(fed)
    start = int(cache.pad[i])
    k = [layer[i, :, start:start + n].clone() for layer in cache.k]  # (Hkv, n, d) each
    v = [layer[i, :, start:start + n].clone() for layer in cache.v]
    prompt_cache.store(namespace, tuple(fed[:n]), k, v)


def _append_steps(rows, steps, new, reasons, texts, max_new_tokens: int, stop_ids: set, tokenizer, stops, windows
                  ) -> None:
    """Append each row's tokens of this step (its next token, then any accepted draft tokens) to new[row] until
    the row stops, recording why (reasons) and its text where a stop string ended it (texts)."""
    for b, tokens in zip(rows, steps):
        for t in tokens[:max_new_tokens - len(new[b])]:
            new[b].append(t)
            reasons[b], texts[b] = _check_stop(new[b], stop_ids, tokenizer, stops[b], windows[b])
            if reasons[b]:
                break  # drafted tokens after a stop are dropped


def _check_stop(new: list[int], stop_ids: set, tokenizer, stop_strings, window: int
                ) -> tuple[str | None, str | None]:
    """model.stop_reason, decoding every new token only when the last `window` hold a stop string: only they can
    hold one that was not there a step ago (it may span tokens)."""
    if new[-1] in stop_ids:
        return "stop_id", None
    if stop_strings and any(s in tokenizer.decode(new[-window:]) for s in stop_strings):
        return stop_reason(new, stop_ids, tokenizer, stop_strings)
    return None, None


# ----------------------------------------------------------------------------------------------------------------
# 5. Batch-invariant decoding
# ----------------------------------------------------------------------------------------------------------------

INVARIANT_ROWS = 16  # every product of a batch-invariant decode step runs on exactly this many rows


def in_pieces(fn, x: torch.Tensor, rows: int):
    """fn applied to x (N, ...) in pieces of exactly `rows` rows (N a multiple of rows), the pieces' outputs
    concatenated (fn may return one tensor or a list). A matmul kernel picks its blocking, and so the order of
    its sums, by the shape it is given; at one fixed shape, a row's result does not depend on the other rows."""
    outs = [fn(piece) for piece in x.split(rows)]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return [torch.cat(parts) for parts in zip(*outs)]


def hidden_invariant(model: Transformer, fed: list[list[int]], caches: list[KVCache], rows: int = INVARIANT_ROWS
                     ) -> torch.Tensor:
    """Final-norm hidden states (N, D) of each row's fed tokens, row b continuing its own one-row caches[b]; the
    rows' tokens are stacked (N = sum of len(fed[b])), in order.

    A row's values are the same bits whichever rows it is decoded with: every product and norm runs on pieces of
    exactly `rows` token rows (zero rows pad the last piece), and attention runs row by row on the row's own
    cache, as it would alone. The rows share only the reading of the weights."""
    spans, start = [], 0
    for tokens in fed:
        spans.append((start, start + len(tokens)))
        start += len(tokens)
    padded = -(-start // rows) * rows
    device = caches[0].pad.device
    ids = torch.tensor([t for tokens in fed for t in tokens] + [0] * (padded - start), device=device)
    x = model.model.embed_tokens(ids)  # (Np, D)
    ropes = []  # per row: RoPE cos/sin (1, 1, T, d) and mask of its new tokens, from its own cache
    for (s, e), cache in zip(spans, caches):
        positions, mask = cache.positions_and_mask(e - s, device)
        ropes.append((*rope_cos_sin(model.inv_freq, positions, x.dtype), mask))
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        q, k, v = in_pieces(lambda p: project_together(block.input_layernorm(p), None, attn.q_proj, attn.k_proj,
                                                       attn.v_proj), x, rows)  # (Np, H*d), (Np, Hkv*d) x2
        y = torch.zeros_like(q)  # (Np, H*d); padding rows attend to nothing
        for (s, e), (cos, sin, mask), cache in zip(spans, ropes, caches):
            y[s:e] = attn.attend(q[None, s:e], k[None, s:e], v[None, s:e], cos, sin, mask, cache)[0]
        x = x + in_pieces(lambda p: project_together(p, None, attn.o_proj)[0], y, rows)
        gate, up = in_pieces(lambda p: project_together(block.post_attention_layernorm(p), None, mlp.gate_proj,
                                                        mlp.up_proj), x, rows)
        x = x + in_pieces(lambda p: project_together(p, None, mlp.down_proj)[0], F.silu(gate) * up, rows)
    for (s, e), cache in zip(spans, caches):
        cache.length += e - s
    return in_pieces(model.model.norm, x, rows)[:start]


def logits_invariant(model: Transformer, h: torch.Tensor, rows: int = INVARIANT_ROWS) -> torch.Tensor:
    """The vocabulary projection (N, V) of hidden states h (N, D), in pieces of exactly `rows` rows."""
    n = h.shape[0]
    padded = torch.cat([h, h.new_zeros(-n % rows, h.shape[1])])  # (Np, D)
    return in_pieces(model.lm_head, padded, rows)[:n]


@torch.inference_mode()
def generate_invariant(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(),
                       tokenizer: Tokenizer | None = None, stop_strings=(), prompt_cache: PromptCache | None = None,
                       namespace=None, prefill_chunk: int = 64, prompt_lookup: int = 0,
                       rows: int = INVARIANT_ROWS) -> list[Generation]:
    """model.generate's greedy continuations (up to fp rounding), decoded in one batch with batch-invariant
    results: each prompt's tokens are the same bits whether it is decoded alone or with any other prompts, so
    how calls are batched (--workers, --max-batch) never changes a trajectory or a metric.

    Each prompt is prefilled on its own (in chunks of `prefill_chunk` tokens aligned at position 0, reusing and
    storing whole chunks in the `prompt_cache`, so what the cache held never changes a bit either) into a one-row
    KV cache of its own. Decode steps then feed every unfinished row's next token together (`hidden_invariant`).
    With `prompt_lookup` k > 0 each row also feeds up to k draft tokens copied from its own context and keeps the
    longest run its own predictions confirm: what a row drafts depends only on its tokens, and with products of
    fixed shape a drafted token's values are those it gets decoded alone.
    """
    stops, stop_ids = check_prompts(prompts, stop_strings, tokenizer), set(stop_ids)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    B = len(prompts)
    caches, last, n_cached = [], [], []
    for prompt in prompts:
        cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device, dtype)
        h, cached = _prefill_row(model, cache, 0, prompt, prompt_cache, namespace, prefill_chunk, lambda r: None)
        cache.length = len(prompt)
        if prompt_cache is not None:  # only whole prompt chunks are stored: decode steps round differently
            _store_row(prompt_cache, namespace, cache, 0, prompt, len(prompt), prefill_chunk)
        caches.append(cache)
        last.append(h)
        n_cached.append(cached)
    windows = [max((len(s) for s in row_stops), default=0) + 8 for row_stops in stops]

    new: list[list[int]] = [[] for _ in range(B)]
    texts: list[str | None] = [None] * B
    reasons: list[str | None] = [None] * B
    indexes = [NgramIndex(p) for p in prompts] if prompt_lookup else None
    live = list(range(B))  # prompts still decoding
    steps = [[t] for t in logits_invariant(model, torch.stack(last), rows).argmax(-1).tolist()]
    while True:
        _append_steps(live, steps, new, reasons, texts, max_new_tokens, stop_ids, tokenizer, stops, windows)
        live = [b for b in live if reasons[b] is None and len(new[b]) < max_new_tokens]
        if not live:
            break
        drafts = []
        for b in live:
            if indexes is None:
                drafts.append([])
                continue
            index = indexes[b]
            index.extend(new[b][len(index.tokens) - len(prompts[b]):])  # its tokens so far, the last included
            drafts.append(index.draft(min(prompt_lookup, max_new_tokens - len(new[b]) - 1)))
        fed = [[new[b][-1]] + draft for b, draft in zip(live, drafts)]
        predicted = logits_invariant(model, hidden_invariant(model, fed, [caches[b] for b in live], rows),
                                     rows).argmax(-1).tolist()  # the model's token after each fed one
        steps, start = [], 0
        for b, draft in zip(live, drafts):
            mine = predicted[start:start + 1 + len(draft)]
            start += 1 + len(draft)
            accepted = next((j for j, (d, t) in enumerate(zip(draft, mine)) if d != t), len(draft))
            caches[b].length -= len(draft) - accepted  # slots of rejected draft tokens are overwritten later
            steps.append(mine[:accepted + 1])
    return [finish(new[b], texts[b], reasons[b], len(prompts[b]), tokenizer, n_cached[b]) for b in range(B)]
