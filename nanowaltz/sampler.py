"""Token-level generation for the two agents: chat token ids in, sampled tokens and their log-probs out.

rollout.py builds each agent's chat and calls `sample` here. Generation is a small hand-written sampling loop with a KV
cache and left padding (instead of `model.generate`) because RL needs three things generate() does not give directly:
the log-prob of every sampled token under the sampling distribution, the exact token ids the agent was conditioned on
(`chat_ids`, so training never re-tokenises), and per-sequence early stopping for the feedback agent.

Engineering that changes no number: every context of an agent starts with the same system prompt (~240 tokens for the
feedback agent, most of its context). Its keys/values are computed once (`prefix_kv`; when, and for how long they stay
valid, is rollout.shared_prefix's business) and every batch starts from a copy of them: layout [shared prefix | left
padding | rest of each context]. The sampled tokens and their log-probs are those of the plain path
(tests/test_prefix_cache.py). A decoding step reads all the weights whatever the batch, so more rows cost little more.
Drafts (`sample`'s draft argument) let one forward produce several tokens where the text that comes next is
predictable (the feedback JSON's keys): the drafted tokens are fed with the row's last token, and each is kept only
if the sampler, drawing from the model's distribution at its position, draws exactly it: the distribution of what
is sampled stays the same, only the random numbers drawn for it differ (tests/test_drafts.py).

`sample` keeps a top_p argument for callers that never train on the log-probs it returns; rollouts use none
(rollout.py says why).
"""
import re
from dataclasses import dataclass

import torch

from nanowaltz.base_model import cache_keyword


def chat_ids(tokenizer, messages, prefill: str = "") -> list:
    """Token ids of a chat ready for the assistant's reply (plus an optional prefill of that reply).

    Only the chat template's own markup becomes special tokens. Message text (the user's prompt, an agent's answer,
    feedback) is tokenised with special tokens switched off, so a prompt containing "<|im_end|><|im_start|>system"
    stays plain text and cannot forge a turn (chat-template injection). To tell markup from text, the template is
    rendered with a placeholder per message; the special tokens of the markup are then the only split points, as in
    the tokenizer's own splitting, so for honest text the ids equal `apply_chat_template(..., tokenize=True)`.
    """
    placeholders = [dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(placeholders, add_generation_prompt=True, tokenize=False)
    pieces = re.split("\ue000(\\d+)\ue001", rendered)  # markup, message index, markup, ..., markup
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    if [int(i) for i in pieces[1::2]] != list(range(len(messages))):
        # The template rewrote the placeholders (it transforms message text): render the real text instead, with
        # every special-token string in it broken by a zero-width space.
        escaped = [dict(m, content=escape_special_tokens(m["content"], specials)) for m in messages]
        pieces = [tokenizer.apply_chat_template(escaped, add_generation_prompt=True, tokenize=False)]
    split_at_specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def plain(text):  # special-token strings in text stay text
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []

    ids, text = [], ""
    for index, piece in enumerate(pieces):
        if index % 2:  # a message's text
            text += messages[int(piece)]["content"]
            continue
        parts = split_at_specials.split(piece) if split_at_specials else [piece]
        for j, part in enumerate(parts):
            if j % 2:  # a special token of the markup: a real one
                ids += plain(text) + [tokenizer.convert_tokens_to_ids(part)]
                text = ""
            else:
                text += part
    ids += plain(text)
    if prefill:
        ids += tokenizer(prefill, add_special_tokens=False)["input_ids"]
    return ids


def escape_special_tokens(text: str, specials) -> str:
    """Break every special-token string in text with a zero-width space after its first character."""
    for token in specials:
        text = text.replace(token, token[:1] + "\u200b" + token[1:])
    return text


def stop_token_ids(model, tokenizer) -> set:
    """End-of-turn tokens: the tokenizer's EOS, the generation config's EOS list, and ChatML's <|im_end|>."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return {i for i in ids if i is not None}


# ---------------------------------------------------------------------------------------------------------------------
# Shared-prefix KV cache: every context of an agent starts with the same system prompt
# ---------------------------------------------------------------------------------------------------------------------
MIN_SHARED_PREFIX = 16  # tokens; a shorter common start is not worth a separate forward


@dataclass
class SharedPrefix:
    """Token ids that every context of a batch starts with, and their keys/values under the active agent."""

    ids: list
    cache: object  # a transformers DynamicCache holding the KV of `ids` at batch size 1


def common_prefix_length(sequences) -> int:
    """How many leading tokens all sequences share."""
    shortest, length = min(len(s) for s in sequences), 0
    while length < shortest and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def system_prefix_ids(tokenizer, system_prompt: str) -> list:
    """The chat-template tokens before the user's text: the system message and the header of the user turn. Found as
    the common start of two chats that differ only in the user's text, so it holds for any chat template."""
    system = {"role": "system", "content": system_prompt}
    first, second = (chat_ids(tokenizer, [system, {"role": "user", "content": text}]) for text in ("A", "B"))
    return first[:common_prefix_length([first, second])]


@torch.no_grad()
def prefix_kv(model, ids) -> SharedPrefix:
    """Run `ids` through the model once (the active adapter applies) and keep their keys/values."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)  # the forward fills it in place
    device = next(model.parameters()).device
    model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1,
          **{cache_keyword(model): cache})
    return SharedPrefix(list(ids), cache)


def batch_cache(model, prefix, batch: int):
    """A fresh KV cache for `batch` rows, holding the shared prefix's keys/values in every row (empty without one)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if prefix is not None:
        for index, layer in enumerate(prefix.cache.layers):
            if layer.is_initialized:  # expand is a view; the cache's first update copies it into [batch, ...] tensors
                cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), index)
    return cache


def draw_tokens(probs):
    """One token per row, drawn with probability `probs` (rows of non-negative weights): the exponential race,
    argmax_i p_i / E_i with E_i ~ Exp(1) independent, which picks token i with probability p_i / sum(p) exactly (the
    first of independent exponential clocks with rates p_i to ring). A zero-probability token never wins (0 / E = 0).

    Why not torch.multinomial: it is about twice as slow on a CPU (docs/performance.md, `bench/draw_tokens.py`).
    Why not inverse-CDF sampling (a uniform located in the running sum): where thousands of tokens have probabilities
    of ~1e-6, their interval bounds sit closer together than the float noise between two numerically different
    forwards (the prefix-cached and plain paths differ by ~1e-6 in total variation), so the same random number can
    draw a different token. The race compares each token only with its own noise: scaling every probability alike
    changes nothing, and a flip needs two tokens tied to within that noise."""
    exponential = torch.rand_like(probs).log_().neg_()  # U = 0 gives E = inf: p / inf = 0, that token cannot win
    return (probs / exponential).argmax(-1)


# A decoding step that feeds drafts runs rows x (1 + draft length) positions. While a forward is bound by reading the
# weights (up to ~16 positions on a CPU: docs/performance.md) it costs about what a one-token step costs; much wider,
# it is bound by arithmetic and costs more than the steps it may save, since a batch runs until its slowest row ends,
# which a draft shortens only if that row keeps it. So decoding steps draft only within this many positions (at batch
# 1: drafts of up to 15 tokens). The prefill always drafts: it is wide anyway, and a few more positions per row add
# little to it.
MAX_DRAFTED_POSITIONS = 16


def next_tokens(logits, temperature, top_p):
    """Tokens drawn from `logits` (any leading shape, vocabulary last) and their log-probs under the tempered
    distribution; greedy (argmax, plain log-softmax) when temperature is 0."""
    logits = logits.float()
    if temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    step_logprobs = torch.log_softmax(logits / temperature, dim=-1)
    probs = step_logprobs.exp()
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    tokens = draw_tokens(probs)
    return tokens, step_logprobs.gather(-1, tokens[..., None]).squeeze(-1)


def drafts_block(drafts, pad_id, device):
    """Per-row draft token lists as input columns: (ids [batch, k], mask [batch, k]), padded on the right with
    masked pad tokens; k = the longest draft (0 when no row has one)."""
    width = max(len(d) for d in drafts)
    ids = torch.full((len(drafts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(drafts), width), dtype=torch.long, device=device)
    for row, draft in enumerate(drafts):
        ids[row, :len(draft)] = torch.tensor(draft, dtype=torch.long, device=device)
        mask[row, :len(draft)] = 1
    return ids, mask


@torch.no_grad()
def sample(model, tokenizer, contexts, max_new_tokens, temperature=1.0, top_p=1.0, prefix_texts=None,
           stop=None, prefix=None, draft=None):
    """Sample continuations for a batch of token-id contexts. Returns (actions, logprobs, truncated) lists.

    stop: a function from a row's text so far (prefix_texts + decoded action) to True when that row is finished
    before an end-of-turn token (the feedback agent's rule is feedback_json.feedback_stop).
    prefix: a SharedPrefix that every context starts with; its keys/values are reused instead of recomputed.
    draft: a function from a row's text so far (prefix_texts + decoded action) to token ids that probably come next
    (rollout.feedback_drafts: the JSON keys). They are fed in the same forward as the row's last token and kept as
    far as the sampler, drawing at each of their positions from the model's own distribution, draws exactly them:
    a token drawn that way is a sample like any other, so drafting changes how many forwards a turn takes, never
    the distribution of what it samples (speculative sampling, Leviathan et al. 2023, arXiv 2211.17192, with a draft
    that puts all its mass on one token: accept with probability p(token), else the draw itself is the rejection
    sample). Drafted tokens the sampler did not draw stay in the KV cache with attention mask 0, as if absent. The
    prefill always takes the drafts; a decoding step only while it stays narrow (MAX_DRAFTED_POSITIONS).

    Layout: [shared prefix | left padding | rest of each context | new tokens]. Left padding puts every context's
    last token in the same column, so one forward step extends all sequences; the attention mask is 0 on the padding
    and on unconfirmed draft tokens, and position ids are the mask's running count, so every row's positions are
    contiguous (0, 1, 2, ...) as if it were alone.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    stops = stop_token_ids(model, tokenizer)
    start = len(prefix.ids) if prefix is not None else 0
    if prefix is not None and any(ctx[:start] != prefix.ids or len(ctx) == start for ctx in contexts):
        raise ValueError("sample: every context must start with prefix.ids and go on after it")
    rests = [ctx[start:] for ctx in contexts]
    batch, longest = len(rests), max(len(r) for r in rests)
    prefix_texts = list(prefix_texts) if prefix_texts is not None else [""] * batch

    def drafts_for(texts, active):  # at most what still fits under max_new_tokens after the token drawn last
        return [draft(text)[:max_new_tokens - len(actions[row]) - 1] if draft is not None and active[row] else []
                for row, text in enumerate(texts)]

    actions = [[] for _ in range(batch)]
    logprobs = [[] for _ in range(batch)]
    done = [False] * batch
    texts = list(prefix_texts)  # each row's text so far (kept up to date only when something reads it)
    drafts = drafts_for(texts, [True] * batch)
    draft_ids, draft_mask = drafts_block(drafts, pad_id, device)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((batch, start + longest), dtype=torch.long, device=device)
    attention_mask[:, :start] = 1
    for row, rest in enumerate(rests):
        input_ids[row, longest - len(rest):] = torch.tensor(rest, device=device)
        attention_mask[row, start + longest - len(rest):] = 1
    input_ids = torch.cat([input_ids, draft_ids], dim=1)
    attention_mask = torch.cat([attention_mask, draft_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
    with_cache = {cache_keyword(model): batch_cache(model, prefix, batch)}  # every step extends it in place
    while True:
        # The logits at the row's last token and at each draft token after it: position j predicts the token that
        # follows draft token j - 1, which is the row's next token only if draft tokens 0..j-1 were all drawn.
        kept = 1 + draft_ids.shape[1]
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=kept, **with_cache)
        tokens, token_logprobs = next_tokens(out.logits[:, -kept:], temperature, top_p)
        # One device-to-host copy per step for the whole batch (not two per row).
        for row, (row_tokens, row_logprobs) in enumerate(zip(tokens.tolist(), token_logprobs.tolist())):
            if done[row] or len(actions[row]) >= max_new_tokens:
                continue
            for j, (token, token_logprob) in enumerate(zip(row_tokens, row_logprobs)):
                actions[row].append(token)
                logprobs[row].append(token_logprob)
                if token in stops:
                    done[row] = True
                elif stop is not None or draft is not None:
                    texts[row] = prefix_texts[row] + tokenizer.decode(actions[row], skip_special_tokens=True)
                    done[row] = stop is not None and stop(texts[row])
                if done[row] or len(actions[row]) >= max_new_tokens or j >= len(drafts[row]) \
                        or token != drafts[row][j]:
                    # The draft is kept up to here: mask out the draft tokens after the last one drawn.
                    attention_mask[row, attention_mask.shape[1] - kept + 1 + j:] = 0
                    break
        stopped = [d or len(a) >= max_new_tokens for d, a in zip(done, actions)]
        if all(stopped):
            break  # (no forward for a token that will not be sampled)
        # Stopped rows keep stepping on a pad token (cheaper than reshaping the cache; their output is ignored).
        last = torch.tensor([pad_id if s else a[-1] for s, a in zip(stopped, actions)], device=device)
        drafts = drafts_for(texts, [not s for s in stopped])
        if batch * (1 + max(len(d) for d in drafts)) > MAX_DRAFTED_POSITIONS:
            drafts = [[] for _ in drafts]  # too wide a step to pay for itself (MAX_DRAFTED_POSITIONS)
        draft_ids, draft_mask = drafts_block(drafts, pad_id, device)
        input_ids = torch.cat([last[:, None], draft_ids], dim=1)
        new_mask = torch.cat([torch.ones_like(last[:, None]), draft_mask], dim=1)
        position_ids = attention_mask.sum(-1, keepdim=True) + new_mask.cumsum(-1) - 1
        attention_mask = torch.cat([attention_mask, new_mask], dim=1)
    truncated = [not finished for finished in done]  # a row its stop rule ended counts as finished
    return actions, logprobs, truncated
