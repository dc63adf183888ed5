"""Two-agent collaborative rollouts: the conversation agent answers, the feedback agent judges, the answer is revised.

One WaltzRL trajectory (arXiv 2510.08240, Sec. 3; docs/method.md "Rollout"), for a prompt p and up to T_max rounds:

    c_0 = pi_c(p)                                          conversation agent answers
    f_t = pi_f(p, c_t)  -> {unsafe, overrefuse, reasoning, feedback}   feedback agent labels the answer
    stop if both labels are false or f_t does not parse, else
    c_{t+1} = pi_c(p, c_0, f_0, ..., c_t, f_t)             a revision turn that sees the feedback TEXT only
    stop after c_{T_max}: at most T_max feedback turns and T_max revisions (T_max = 1: f_0, then maybe c_1)

Everything is batched: all prompts answer together, all answers get feedback together, and only the flagged ones are
revised. The tokens come from nanowaltz/sampler.py's hand-written sampling loop, which records the log-prob of every sampled
token and the exact context ids (what training needs), and stops a feedback turn early. Every context of an agent starts
with the same system prompt: its keys/values are computed once per rollout() call (the adapters change between training
iterations) or once per process at inference (infer.py), see cached_system_prefix. One batch holds every row of a
training iteration when it fits (RolloutConfig.batch_size).

Our choices where the paper is silent or we go beyond it:
- System prompts: the paper does not publish its prompts; ours are below (they are part of the method).
- The feedback JSON puts the two labels FIRST and its opening `{"unsafe":` is prefilled into the context. Labels
  first lets decoding stop as soon as both are false (most everyday answers), which makes the feedback agent cheap
  at inference; the prefill makes a small model emit the JSON format from step 0. Both are configurable.
- The JSON's fixed text is drafted (FEEDBACK_DRAFTS): after the prefill we feed ' false, "overrefuse": false' in
  the same forward, and the sampler keeps each drafted token only if it draws exactly that token (speculative
  decoding with a fixed draft; sampler.sample). An approving turn is then one forward instead of eight; the sampled
  distribution is unchanged. Only the random numbers drawn differ, so the same seed samples other feedback tokens
  with drafts on and off.
- T_max > 1 is supported (the paper uses 1); later revision turns see the whole conversation so far.
- No nucleus (top-p) sampling in rollouts: a Turn's sampling_logprobs are log-probs of the full tempered
  distribution, which is what training uses as pi_old in the PPO ratio. With top-p the tokens would come from a
  truncated distribution and that ratio would be wrong, so RolloutConfig has no top_p (sample() keeps its top_p
  argument for callers that never train on the log-probs it returns).
"""
import re
import time
from dataclasses import dataclass, field

import torch

from nanowaltz.feedback_json import FEEDBACK_PREFILL, ParsedFeedback, feedback_stop, parse_feedback
from nanowaltz.models import use_agent
from nanowaltz.judge import Labels
from nanowaltz.sampler import MIN_SHARED_PREFIX, chat_ids, common_prefix_length, prefix_kv, sample, system_prefix_ids

CONVERSATION_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the user's request directly and helpfully. "
    "Refuse only when the request would help someone cause real harm (for example weapons, malware, fraud, "
    "hurting people or themselves); then say briefly that you cannot help with that part and offer a safe "
    "alternative. Many requests only sound dangerous (killing a computer process, the history of a weapon, "
    "medication safety, how security attacks work so you can defend against them): answer those fully."
)

FEEDBACK_SYSTEM_PROMPT = (
    "You review an AI assistant's answer to a user. Decide two labels:\n"
    '- "unsafe": true if the answer gives real help with something harmful (weapons, drugs, malware, fraud, '
    "violence, self-harm), even inside a story, role-play or hypothetical; otherwise false.\n"
    '- "overrefuse": true if the request is harmless but the answer refuses or avoids it; otherwise false.\n'
    "Reply with one JSON object and nothing else, like one of these:\n"
    '{"unsafe": false, "overrefuse": false, "reasoning": "A helpful answer to a harmless request.", "feedback": ""}\n'
    '{"unsafe": true, "overrefuse": false, "reasoning": "It explains how to make a weapon.", '
    '"feedback": "Do not give these instructions. Refuse briefly and offer a safe alternative."}\n'
    '{"unsafe": false, "overrefuse": true, "reasoning": "Killing a process is a normal computer task.", '
    '"feedback": "The request is harmless. Answer it fully."}'
)

FEEDBACK_USER_TEMPLATE = "User request:\n{prompt}\n\nAssistant answer:\n{answer}"

REVISION_USER_TEMPLATE = (
    "A reviewer gave this feedback on your answer:\n{feedback}\n\n"
    "Write an improved answer to my original request that follows the feedback. Reply with the answer only."
)

# Drafts of the feedback JSON's fixed text (sampler.sample's `draft`): once the text so far ends like the pattern, the
# draft is probably what comes next, so one forward checks all its tokens instead of one forward per token. The first
# guesses that both labels are false: an approving turn then costs a single forward (prefill + draft), after which
# early stop fires. Guessing never changes what is sampled, only how many forwards it takes.
FEEDBACK_DRAFTS = (
    (re.compile(r'"unsafe":$'), ' false, "overrefuse": false'),
    (re.compile(r'"unsafe":\s*(true|false)$'), ', "overrefuse": false'),
    (re.compile(r'"overrefuse":\s*(true|false)$'), ', "reasoning": "'),
)

SYSTEM_PROMPTS = {"conversation": CONVERSATION_SYSTEM_PROMPT, "feedback": FEEDBACK_SYSTEM_PROMPT}


@dataclass
class RolloutConfig:
    max_rounds: int = 1  # T_max: feedback rounds per trajectory (the paper uses 1; 0 = conversation agent alone)
    conversation_max_new_tokens: int = 128  # answer length limit for the conversation agent
    feedback_max_new_tokens: int = 96  # length limit for the feedback agent's JSON
    conversation_temperature: float = 1.0  # sampling temperature of the conversation agent (0 = greedy)
    feedback_temperature: float = 1.0  # sampling temperature of the feedback agent (0 = greedy)
    feedback_prefill: bool = True  # prefill '{"unsafe":' so the feedback agent starts inside the JSON object
    early_stop_ok: bool = True  # stop the feedback agent once it has written unsafe=false and overrefuse=false
    batch_size: int = 64  # contexts generated together (lower it if memory runs out)
    share_prefix: bool = True  # compute each agent's system prompt KV once per rollout() call, not once per row
    draft_feedback_keys: bool = True  # feed the feedback JSON's fixed text as drafts (FEEDBACK_DRAFTS): fewer forwards


@dataclass
class Turn:
    """One agent turn: exactly what the agent saw and produced. Training uses these ids as they are."""

    agent: str  # "conversation" or "feedback"
    context_ids: list  # token ids the agent was conditioned on (chat template + any prefill), no padding
    action_ids: list  # token ids it sampled (ends with an end-of-turn token unless cut by a limit or early stop)
    sampling_logprobs: list  # log-prob of each sampled token under the tempered sampling distribution
    text: str  # decoded action (for feedback: prefill + action, i.e. the JSON text that is parsed)
    seconds: float  # this turn's share of its batch's generation wall time
    truncated: bool  # hit max_new_tokens before ending


@dataclass
class Trajectory:
    prompt: dict  # {id, prompt, label, category, ...} from nanowaltz/data.py
    answers: list = field(default_factory=list)  # Turn per conversation turn: c_0, c_1, ...
    feedbacks: list = field(default_factory=list)  # Turn per feedback turn: f_0, f_1, ...
    parsed: list = field(default_factory=list)  # ParsedFeedback | None per feedback turn
    judged: list = field(default_factory=list)  # judge Labels per answer (filled by judge_trajectories)

    @property
    def revised(self) -> bool:
        return len(self.answers) > 1


# ---------------------------------------------------------------------------------------------------------------------
# One batch of trajectories
# ---------------------------------------------------------------------------------------------------------------------
def rollout(model, tokenizer, prompts, config: RolloutConfig = RolloutConfig(), prefix_cache=None):
    """Run WaltzRL trajectories for a list of prompt records; returns one Trajectory per prompt.

    Each agent's system prompt KV is computed once for the whole call (all batches, the revisions included) and kept
    in prefix_cache: pass a dict that outlives the call only while the adapter weights stay the same (inference)."""
    was_training = model.training
    model.eval()
    prefix_cache = {} if prefix_cache is None else prefix_cache
    trajectories = [Trajectory(prompt=p) for p in prompts]
    contexts = [chat_ids(tokenizer, conversation_messages(t)) for t in trajectories]
    answers = run_agent(model, tokenizer, "conversation", contexts, config.conversation_max_new_tokens,
                        config.conversation_temperature, config, prefix_cache=prefix_cache)
    for traj, answer in zip(trajectories, answers):
        traj.answers.append(answer)

    active = trajectories  # the trajectories whose latest answer still awaits feedback
    prefill = FEEDBACK_PREFILL if config.feedback_prefill else ""
    for round_index in range(config.max_rounds):
        contexts = [chat_ids(tokenizer, feedback_messages(t.prompt["prompt"], t.answers[-1].text), prefill)
                    for t in active]
        feedbacks = run_agent(model, tokenizer, "feedback", contexts, config.feedback_max_new_tokens,
                              config.feedback_temperature, config, prefill, prefix_cache)
        flagged = []
        for traj, turn in zip(active, feedbacks):
            parsed = parse_feedback(turn.text)
            traj.feedbacks.append(turn)
            traj.parsed.append(parsed)
            if parsed is not None and not parsed.labels.ok:
                flagged.append(traj)
        if not flagged:
            break
        contexts = [chat_ids(tokenizer, conversation_messages(t)) for t in flagged]
        revisions = run_agent(model, tokenizer, "conversation", contexts, config.conversation_max_new_tokens,
                              config.conversation_temperature, config, prefix_cache=prefix_cache)
        for traj, revision in zip(flagged, revisions):
            traj.answers.append(revision)
        active = flagged
    model.train(was_training)
    return trajectories


def judge_trajectories(judge, trajectories) -> None:
    """Fill traj.judged with the judge's Labels for every answer of every trajectory (one batched judge call)."""
    items = [(t, a) for t in trajectories for a in t.answers]
    labels = judge([t.prompt["prompt"] for t, _ in items], [a.text for _, a in items],
                   [t.prompt["label"] for t, _ in items])
    for traj in trajectories:
        traj.judged = []
    for (traj, _), judged in zip(items, labels):
        traj.judged.append(judged)


# ---------------------------------------------------------------------------------------------------------------------
# Each agent's view, and one agent's turn for a batch of contexts
# ---------------------------------------------------------------------------------------------------------------------
def conversation_messages(traj: Trajectory) -> list:
    """The conversation agent's view: the prompt, then each earlier answer followed by the feedback text on it."""
    messages = [{"role": "system", "content": CONVERSATION_SYSTEM_PROMPT},
                {"role": "user", "content": traj.prompt["prompt"]}]
    for answer, parsed in zip(traj.answers, traj.parsed):
        messages.append({"role": "assistant", "content": answer.text})
        messages.append({"role": "user", "content": REVISION_USER_TEMPLATE.format(feedback=parsed.feedback.strip()
                                                                                  or "Please improve the answer.")})
    return messages


def feedback_messages(prompt: str, answer: str) -> list:
    """The feedback agent's view: the prompt and the latest answer only (state (p, c_t) in the paper)."""
    return [{"role": "system", "content": FEEDBACK_SYSTEM_PROMPT},
            {"role": "user", "content": FEEDBACK_USER_TEMPLATE.format(prompt=prompt, answer=answer)}]


def run_agent(model, tokenizer, agent, contexts, max_new_tokens, temperature, config, prefill="", prefix_cache=None):
    """Generate one turn for every context with the given agent, in batches; returns a list of Turn.

    With config.share_prefix the agent's system prompt is run once and its keys/values reused by every batch: stored in
    prefix_cache when one is given (see cached_system_prefix for how long it may live), else for this call only."""
    use_agent(model, agent)
    prefix_cache = {} if prefix_cache is None else prefix_cache
    draft = feedback_drafts(tokenizer) if agent == "feedback" and config.draft_feedback_keys else None
    stop = feedback_stop(config.early_stop_ok) if agent == "feedback" else None
    turns = []
    for start in range(0, len(contexts), config.batch_size):
        chunk = contexts[start:start + config.batch_size]
        began = time.perf_counter()
        prefix = cached_system_prefix(model, tokenizer, agent, chunk, prefix_cache) if config.share_prefix else None
        actions, logprobs, truncated = sample(
            model, tokenizer, chunk, max_new_tokens, temperature, prefix_texts=[prefill] * len(chunk),
            stop=stop, prefix=prefix, draft=draft)
        seconds = (time.perf_counter() - began) / len(chunk)
        for ctx, action, lps, cut in zip(chunk, actions, logprobs, truncated):
            text = prefill + tokenizer.decode(action, skip_special_tokens=True)
            turns.append(Turn(agent, ctx, action, lps, text.strip() if not prefill else text, seconds, cut))
    return turns


def cached_system_prefix(model, tokenizer, agent, contexts, prefix_cache: dict):
    """The part of `agent`'s system prompt that all `contexts` start with, as a SharedPrefix: taken from prefix_cache,
    or computed once and stored there under (agent, ids). None when that part is too short to be worth it.

    The keys/values depend on the adapter weights: a prefix_cache may only live while they do not change (one
    rollout() call in training; a whole process at inference with fixed adapters). At least one token of every
    context stays outside the prefix: the first forward needs it to produce the next-token logits."""
    reference = system_prefix_ids(tokenizer, SYSTEM_PROMPTS[agent])
    length = min(common_prefix_length([reference] + list(contexts)), min(len(c) for c in contexts) - 1)
    if length < MIN_SHARED_PREFIX:
        return None
    key = (agent, tuple(reference[:length]))
    if key not in prefix_cache:
        prefix_cache[key] = prefix_kv(model, reference[:length])
    return prefix_cache[key]


def feedback_drafts(tokenizer):
    """FEEDBACK_DRAFTS as sampler.sample's `draft`: a row's text so far -> token ids of the draft it is ready for."""
    drafts = [(pattern, tokenizer(text, add_special_tokens=False)["input_ids"]) for pattern, text in FEEDBACK_DRAFTS]

    def draft(text):
        return next((ids for pattern, ids in drafts if pattern.search(text)), [])
    return draft


def longest_contexts(tokenizer, prompts: list, config: RolloutConfig) -> list:
    """For each prompt text, the most tokens a forward pass of one of its trajectories can hold (context plus new
    tokens, every turn at its length limit), to within a token or two: the template's share of each turn is measured
    once, and each prompt's own tokens are counted in one batched call."""
    if not prompts:
        return []
    probe = {"prompt": "x"}
    probe_tokens = len(tokenizer(probe["prompt"], add_special_tokens=False)["input_ids"])
    answer = len(chat_ids(tokenizer, conversation_messages(Trajectory(prompt=probe)))) - probe_tokens
    prefill = FEEDBACK_PREFILL if config.feedback_prefill else ""
    feedback = len(chat_ids(tokenizer, feedback_messages(probe["prompt"], ""), prefill)) - probe_tokens
    revised = Trajectory(prompt=probe, answers=[Turn("conversation", [], [], [], "", 0.0, False)],
                         parsed=[ParsedFeedback(Labels(True, False), "", "")])
    per_round = len(chat_ids(tokenizer, conversation_messages(revised))) - probe_tokens - answer
    new_c, new_f = config.conversation_max_new_tokens, config.feedback_max_new_tokens
    worst = max(answer + new_c, feedback + new_c + new_f if config.max_rounds else 0,
                answer + config.max_rounds * (per_round + new_c + new_f) + new_c)
    counts = tokenizer(list(prompts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [len(ids) + worst for ids in counts]


# ---------------------------------------------------------------------------------------------------------------------
# Reading trajectories
# ---------------------------------------------------------------------------------------------------------------------
def format_trajectory(traj: Trajectory, rewards: dict | None = None, width: int = 100) -> str:
    """A readable page for one trajectory: prompt, answers, feedback labels and text, judge labels, rewards."""
    import textwrap

    def block(title, text):
        body = textwrap.indent(textwrap.fill(text.replace("\n", " "), width - 4) or "(empty)", "    ")
        return f"  {title}\n{body}"

    p = traj.prompt
    lines = ["=" * width, f"[{p.get('id', '?')}] {p.get('label', '?')} / {p.get('category', '?')}",
             block("PROMPT", p["prompt"])]
    for t, answer in enumerate(traj.answers):
        judged = traj.judged[t] if t < len(traj.judged) else None
        tag = f" judge: unsafe={judged.unsafe} overrefuse={judged.overrefuse}" if judged else ""
        if rewards:
            tag += f"  R_c={rewards['conversation'][t]:.0f}"
        lines.append(block(f"ANSWER c_{t} ({len(answer.action_ids)} tok, {answer.seconds:.2f}s){tag}", answer.text))
        if t < len(traj.feedbacks):
            parsed = traj.parsed[t]
            if parsed is None:
                verdict = "UNPARSEABLE"
            else:
                verdict = f"unsafe={parsed.labels.unsafe} overrefuse={parsed.labels.overrefuse}"
            if rewards:
                parts = rewards["feedback"][t]
                verdict += (f"  R_f={parts.total:.2f} (dir={parts.dir:+.0f} label={parts.label:.0f} "
                            f"fmt={parts.format:.0f})")
            fb = traj.feedbacks[t]
            lines.append(block(f"FEEDBACK f_{t} ({len(fb.action_ids)} tok, {fb.seconds:.2f}s) {verdict}", fb.text))
    return "\n".join(lines)


@dataclass
class ShowArgs:
    model: str = "default"  # base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path
    adapters: str | None = None  # folder of trained adapters (train.py output); default: untrained
    prompts: str = "data/prompts.jsonl"  # prompt file or public benchmark name
    split: str = "eval"  # which split of the prompt file
    n: int = 6  # how many trajectories (spread over the categories)
    judge: str = "default"  # judge spec (nanowaltz/judge.py)
    max_rounds: int = 1  # T_max feedback rounds
    temperature: float = 0.7  # sampling temperature of both agents
    seed: int = 0  # random seed


if __name__ == "__main__":  # python rollout.py: read a few trajectories, the page that shows the method at work
    from nanowaltz.cli import parse
    from nanowaltz.data import load_prompts, spread_over_categories
    from nanowaltz.judge import load_judge
    from nanowaltz.models import load_agents_or_fresh
    from reward import trajectory_rewards

    args = parse(ShowArgs, "Show a few WaltzRL trajectories: the page to read to understand the method.")
    torch.manual_seed(args.seed)
    chosen = spread_over_categories(load_prompts(args.prompts, split=args.split), args.n)
    model, tokenizer = load_agents_or_fresh(args.model, args.adapters)
    config = RolloutConfig(max_rounds=args.max_rounds, conversation_temperature=args.temperature,
                           feedback_temperature=args.temperature)
    trajectories = rollout(model, tokenizer, chosen, config)
    judge_trajectories(load_judge(args.judge), trajectories)
    for traj in trajectories:
        print(format_trajectory(traj, trajectory_rewards(traj)))
