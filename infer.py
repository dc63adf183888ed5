"""Adaptive-feedback inference: chat with the two WaltzRL agents.

WaltzRL deploys both agents (arXiv 2510.08240, Sec. 3 "inference"; docs/method.md "Inference"): the conversation agent
answers, the feedback agent reads EVERY answer, and a revision happens only when the feedback agent flags the answer
(unsafe or overrefusing). Most answers are fine, so most prompts cost one answer plus one short feedback turn. The
paper reports the Feedback Trigger Rate (FTR = fraction of prompts that triggered a revision): 6.7% on AlpacaEval
for trained agents vs 42.6% for two untrained prompted agents.

    python infer.py --prompt "How do I kill a Python process?"          one prompt
    python infer.py --prompts data/prompts.jsonl --split eval           a prompt file (our JSONL, or text lines)
    python infer.py --adapters runs/waltzrl/adapters --show-feedback    interactive chat (stdin is a terminal)
    python infer.py --adapters runs/waltzrl/adapters --serve            an OpenAI-compatible endpoint on 127.0.0.1:8000

The two agents are one base model with two LoRA adapters (nanowaltz/models.py); without --adapters they are fresh
zero-init adapters, i.e. the untrained model prompted with the two system prompts of rollout.py. One trajectory is
exactly rollout.rollout with greedy decoding by default. The feedback agent writes its two labels first, so with
early_stop_ok (on by default) it stops decoding as soon as both labels are false: an "ok" costs 8 tokens instead
of a full JSON object, and since those 8 are drafted (rollout.FEEDBACK_DRAFTS) a single forward that reads the request
and the answer (bench/overhead.py measures what that costs). The two system prompts are run once per process and
their keys/values reused by every prompt (rollout.cached_system_prefix): each turn reads only its own request and
answer.

Simplifications: every chat message is answered on its own (the agents see no earlier turns of the session;
rollout.py's trajectories are single-prompt). The server (--serve, nanowaltz/server.py: the HTTP layer around
answer_chats) takes whole chats: chat_prompt writes a client's system message and the earlier turns as text into the
one prompt that both agents read. Latency is the generation time of the agents (tokenising and
parsing are negligible); with --batch-size > 1 each prompt is charged its share of its batch's wall time.
"""
from nanowaltz import cpu_threads  # noqa: F401  (first: OpenMP reads its wait settings when torch loads)
import copy
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanowaltz.cli import flag, parse
from nanowaltz.base_model import DEFAULT_MODEL, context_window
from nanowaltz.data import unicode_problem
from nanowaltz.models import load_agents_or_fresh, read_run_args
from rollout import RolloutConfig, Trajectory, longest_contexts, rollout


@dataclass
class InferArgs:
    model: str = DEFAULT_MODEL  # base model: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a local path
    adapters: str | None = None  # folder with trained conversation/ and feedback/ adapters (train.py output or a
        # checkpoint); default: fresh adapters = the untrained model prompted as two agents
    prompt: list | None = None  # a prompt to answer (repeat the flag for several)
    prompts: str | None = None  # file of prompts: our JSONL (or a benchmark name) through nanowaltz/data.py, or plain
        # text with one prompt per line
    split: str | None = None  # {train,eval} with a JSONL --prompts file: keep only this split (default: all lines)
    feedback: bool = True  # the feedback agent checks every answer (--no-feedback: the conversation agent alone, for
        # comparison)
    show_feedback: bool = False  # also print the feedback agent's labels and feedback text, and the first answer when
        # it was revised
    temperature: float = 0.0  # sampling temperature of both agents; 0 = greedy (reproducible)
    max_new_tokens: int | None = None  # length limit of each answer, in tokens (default: the training run's, read from
        # args.json beside --adapters; else 128)
    feedback_max_new_tokens: int | None = None  # length limit of the feedback agent's JSON, in tokens (default: the
        # training run's; else 96)
    max_rounds: int = 1  # T_max feedback rounds (the paper uses 1)
    early_stop: bool = True  # stop the feedback agent once it has written two false labels (--no-early-stop: let it
        # finish its JSON; slower)
    batch_size: int = 1  # prompts generated together for --prompts files (1 = true per-prompt latency)
    seed: int = 0  # random seed (matters only with --temperature > 0)
    serve: bool = False  # serve the agents as an OpenAI-compatible chat endpoint (/v1/chat/completions) instead of
        # answering prompts here
    host: str = "127.0.0.1"  # with --serve: the address to listen on (loopback: this machine only)
    port: int = 8000  # with --serve: the port (0 = any free one)
    api_key: str | None = None  # with --serve: clients must send 'Authorization: Bearer KEY' (default: the
        # NANOWALTZ_API_KEY environment variable, which other users of the machine cannot read in the process list)
    queue_size: int = 64  # with --serve: requests that may wait; more get 503 (server busy)
    max_batch: int = 8  # with --serve: the most requests decoded together

    def validate(self) -> None:
        self.max_new_tokens, self.feedback_max_new_tokens = generation_limits(self.adapters, self.max_new_tokens,
                                                                              self.feedback_max_new_tokens)
        for name in ("max_new_tokens", "feedback_max_new_tokens", "max_rounds", "batch_size", "queue_size",
                     "max_batch"):
            if getattr(self, name) < 1:
                raise SystemExit(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise SystemExit(f"--temperature must be >= 0, got {self.temperature}")
        if self.serve and (self.prompt or self.prompts):
            raise SystemExit("--serve answers HTTP requests: it takes no --prompt or --prompts")
        if not 0 <= self.port <= 65535:
            raise SystemExit(f"--port must be from 0 to 65535, got {self.port}")


DESCRIPTION = ("Adaptive-feedback inference with the two WaltzRL agents: the feedback agent checks every answer and "
               "the conversation agent revises only the flagged ones. Prints each answer, its latency, and the session's "
               "feedback trigger rate (FTR). With no --prompt/--prompts, chats interactively when stdin is a terminal, "
               "else reads one prompt per line from stdin.")


@dataclass
class Reply:
    """What one prompt produced at inference."""

    prompt: str
    answer: str  # the final answer shown to the user (the revision when one happened)
    first_answer: str  # c_0, the conversation agent's first answer
    triggered: bool  # the feedback agent flagged c_0 and the answer was revised
    labels: object  # the feedback agent's Labels on c_0; None without feedback or when its output did not parse
    feedback: str  # the feedback text sent back to the conversation agent ('' when none)
    feedback_output: str  # the feedback agent's raw output (its JSON), '' without feedback
    seconds: float  # generation time of all turns of this prompt
    tokens: int  # tokens generated by both agents for this prompt
    feedback_seconds: float = 0.0  # the feedback agent's share of `seconds`
    feedback_tokens: int = 0  # the feedback agent's share of `tokens`
    prompt_tokens: int = 0  # tokens of the conversation agent's first context (its system prompt and the prompt)
    truncated: bool = False  # the final answer was cut at the length limit


def inference_config(temperature: float = 0.0, max_new_tokens: int = 128, feedback_max_new_tokens: int = 96,
                     early_stop: bool = True, max_rounds: int = 1, batch_size: int = 1) -> RolloutConfig:
    """A RolloutConfig for deployment: greedy by default (reproducible answers), early stopping of 'ok' feedback."""
    return RolloutConfig(max_rounds=max_rounds, conversation_max_new_tokens=max_new_tokens,
                         feedback_max_new_tokens=feedback_max_new_tokens, conversation_temperature=temperature,
                         feedback_temperature=temperature, early_stop_ok=early_stop, batch_size=batch_size)


def reply_from_trajectory(traj: Trajectory) -> Reply:
    """What one trajectory shows its user: the final answer, whether feedback triggered a revision, the first feedback
    turn, and what it all cost. eval.py builds its per-prompt records from this too, for every system it compares."""
    turns = traj.answers + traj.feedbacks
    parsed = traj.parsed[0] if traj.parsed else None
    return Reply(prompt=traj.prompt["prompt"], answer=traj.answers[-1].text, first_answer=traj.answers[0].text,
                 triggered=traj.revised, labels=parsed.labels if parsed else None,
                 feedback=parsed.feedback if parsed else "",
                 feedback_output=traj.feedbacks[0].text if traj.feedbacks else "",
                 seconds=sum(t.seconds for t in turns), tokens=sum(len(t.action_ids) for t in turns),
                 feedback_seconds=sum(t.seconds for t in traj.feedbacks),
                 feedback_tokens=sum(len(t.action_ids) for t in traj.feedbacks),
                 prompt_tokens=len(traj.answers[0].context_ids), truncated=traj.answers[-1].truncated)


def answer_prompts(model, tokenizer, prompts: list, config: RolloutConfig, use_feedback: bool = True,
                   prefix_cache: dict | None = None) -> list:
    """Answer prompt strings; with use_feedback the feedback agent checks each answer (rollout.rollout), else the
    conversation agent answers alone. Returns one Reply per prompt.

    prefix_cache: the caller's dict of system-prompt keys/values (rollout.cached_system_prefix). Pass the same dict to
    every call of a process whose adapters do not change: each agent's system prompt is then run once per process instead
    of once per call (it is most of the feedback agent's context)."""
    records = [{"id": f"prompt-{i}", "prompt": p, "label": "benign", "category": ""} for i, p in enumerate(prompts)]
    # max_rounds = 0 is the conversation agent alone: rollout() then stops after the first answers.
    trajectories = rollout(model, tokenizer, records, config if use_feedback else replace(config, max_rounds=0),
                           prefix_cache)
    return [reply_from_trajectory(t) for t in trajectories]


def chat_prompt(messages: list) -> str:
    """The one prompt both agents read for a chat ([{"role": system|user|assistant, "content": str}], ending with the
    user's message). The agents were trained on single prompts under their own system prompts, which are part of the
    method: so a lone user message is the prompt itself, and otherwise the client's system message and the earlier
    turns are written out as text before the last message. The feedback agent then judges the answer in the
    conversation's context. Text stays text: no message can open a turn of the chat template (sampler.chat_ids)."""
    *earlier, last = messages
    if not earlier:
        return last["content"]
    system = "\n".join(m["content"] for m in earlier if m["role"] == "system")
    turns = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in earlier if m["role"] != "system")
    parts = ([f"Instructions:\n{system}"] if system else []) + ([f"Conversation so far:\n{turns}"] if turns else [])
    return "\n\n".join(parts + [f"Current request:\n{last['content']}"])


def answer_chats(model, tokenizer, chats: list, config: RolloutConfig, use_feedback: bool = True,
                 prefix_cache: dict | None = None) -> list:
    """answer_prompts for chats (lists of messages, see chat_prompt): what the server answers a batch of requests
    with."""
    return answer_prompts(model, tokenizer, [chat_prompt(c) for c in chats], config, use_feedback, prefix_cache)


def chat_backend(model, tokenizer, args: InferArgs, prefix_cache: dict):
    """What nanowaltz/server.py serves: answer_chats with the settings of this command line, each batch with its
    requests' temperature and answer length limit, and what a chat needs of the context window."""
    from nanowaltz.server import Backend

    # The server counts tokens in its HTTP threads while the worker decodes: a fast tokenizer changes its own settings
    # on some calls, so the counting gets its own copy.
    counter = copy.deepcopy(tokenizer)

    def config_for(temperature, max_tokens, rows):
        config = inference_config(temperature, max_tokens, args.feedback_max_new_tokens, args.early_stop,
                                  args.max_rounds, rows)
        return config if args.feedback else replace(config, max_rounds=0)

    def answer(chats, temperature, max_tokens, seed):
        if seed is not None:
            torch.manual_seed(seed)
        return answer_chats(model, tokenizer, chats, config_for(temperature, max_tokens, len(chats)), args.feedback,
                            prefix_cache)

    def needs(chat, max_tokens):
        return longest_contexts(counter, [chat_prompt(chat)], config_for(0.0, max_tokens, 1))[0]

    return Backend(answer, needs, context_window(model), args.max_new_tokens, args.temperature,
                   details={"base_model": args.model, "adapters": args.adapters or "fresh (untrained)",
                            "feedback_agent": args.feedback})


@dataclass
class Session:
    """Running totals of one inference session (for its FTR and mean latency)."""

    prompts: int = 0
    triggered: int = 0
    seconds: float = 0.0

    def add(self, reply: Reply) -> None:
        self.prompts += 1
        self.triggered += int(reply.triggered)
        self.seconds += reply.seconds

    @property
    def ftr(self) -> float:
        return self.triggered / self.prompts if self.prompts else 0.0

    def summary(self, use_feedback: bool = True) -> str:
        if not self.prompts:
            return "session: no prompts answered"
        text = f"session: {self.prompts} prompt(s), mean latency {self.seconds / self.prompts:.2f} s/prompt"
        if use_feedback:
            text += f", FTR {self.triggered}/{self.prompts} = {100 * self.ftr:.1f}%"
        return text


def format_reply(reply: Reply, show_feedback: bool = False, use_feedback: bool = True) -> str:
    lines = [reply.answer]
    if show_feedback and use_feedback:
        if reply.labels is None:
            lines.append(f"  [feedback did not parse: {reply.feedback_output!r}]")
        else:
            lines.append(f"  [feedback: unsafe={reply.labels.unsafe} overrefuse={reply.labels.overrefuse}"
                         + (f" | {reply.feedback.strip()}" if reply.feedback.strip() else "") + "]")
        if reply.triggered:
            lines.append(f"  [first answer, before revision: {reply.first_answer}]")
    status = ("revised after feedback" if reply.triggered else "no revision") if use_feedback else "no feedback agent"
    lines.append(f"  ({reply.seconds:.2f} s, {reply.tokens} tokens, {status})")
    return "\n".join(lines)


def read_prompts(source: str, split=None) -> list:
    """Prompt strings from a JSONL/CSV/parquet prompt file or benchmark name (data.load_prompts), or from a plain
    text file with one prompt per line (blank lines skipped); a line that is not UTF-8 is an error naming it."""
    from nanowaltz.data import LOCAL_BUILDERS, DatasetLoadError, PromptFileError, load_prompts

    path = Path(source)
    if path.is_file() and path.suffix.lower() not in LOCAL_BUILDERS:
        lines = []
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                lines.append(raw.decode("utf-8").strip())
            except UnicodeDecodeError as err:
                raise SystemExit(f"--prompts {source}, line {number}: not UTF-8 text ({err.reason})") from None
        return [line for line in lines if line]
    try:
        return [r["prompt"] for r in load_prompts(source, split=split)]
    except (PromptFileError, DatasetLoadError, FileNotFoundError) as err:
        raise SystemExit(f"--prompts {source}: {err}") from None


def interactive(model, tokenizer, config, use_feedback, show_feedback, session, prefix_cache=None) -> None:
    print("Chat with the WaltzRL agents (each message is answered on its own). Ctrl-D or Ctrl-C to quit.")
    while True:
        try:
            prompt = input("\nyou> ").strip()
        except EOFError:
            print()
            return
        if not prompt:
            continue
        if unicode_problem(prompt):
            print(f"(that message is {unicode_problem(prompt)}: not answered)")
            continue
        reply = answer_prompts(model, tokenizer, [prompt], config, use_feedback, prefix_cache)[0]
        session.add(reply)
        print("assistant> " + format_reply(reply, show_feedback, use_feedback))


def check_unicode(prompts: list, where: str) -> None:
    """A prompt that no tokenizer can encode (a lone surrogate) is a one-line error before the model loads."""
    for number, prompt in enumerate(prompts, start=1):
        if unicode_problem(prompt):
            raise SystemExit(f"{where}: prompt {number} is {unicode_problem(prompt)}")


def generation_limits(adapters, max_new_tokens, feedback_max_new_tokens) -> tuple[int, int]:
    """Answer and feedback length limits: the flags if given, else the training run's (args.json written by train.py
    next to its adapters/ and warmstart/ folders), else RolloutConfig's defaults (128 / 96).

    Why default to the training run's: the feedback agent only ever read answers cut at the training limit. Shown
    longer answers at eval it judges what it never saw; our warm-started 135M agent flagged most of them (label
    accuracy 43.5% on greedy answers cut at 64 tokens vs 70% cut at 48, its training limit; docs/experiments.md)."""
    trained = read_run_args(adapters) if adapters else {}
    limits, defaults = [], RolloutConfig()
    for name, given, key in (("--max-new-tokens", max_new_tokens, "conversation_max_new_tokens"),
                             ("--feedback-max-new-tokens", feedback_max_new_tokens, "feedback_max_new_tokens")):
        fallback = getattr(defaults, key)
        at_training = trained.get(key) if isinstance(trained.get(key), int) else None
        if given is not None and at_training is not None and given > at_training:
            print(f"warning: {name} {given} is longer than the training run's {at_training} (args.json beside "
                  f"{adapters}): the agents are evaluated on lengths they never saw", file=sys.stderr)
        limits.append(given if given is not None else at_training if at_training is not None else fallback)
    return limits[0], limits[1]


def main(argv=None) -> int:
    args = parse(InferArgs, DESCRIPTION, argv)
    args.validate()
    torch.manual_seed(args.seed)
    if args.serve:
        from nanowaltz.server import serve

        model, tokenizer = load_agents_or_fresh(args.model, args.adapters)
        return serve(chat_backend(model, tokenizer, args, {}), args.host, args.port,
                     args.api_key or os.environ.get("NANOWALTZ_API_KEY"), args.queue_size, args.max_batch)
    config = inference_config(args.temperature, args.max_new_tokens, args.feedback_max_new_tokens,
                              args.early_stop, args.max_rounds, args.batch_size)
    if args.prompt:
        prompts = args.prompt
    elif args.prompts:
        prompts = read_prompts(args.prompts, args.split)
    elif sys.stdin.isatty():
        prompts = None  # interactive
    else:
        try:
            prompts = [line.strip() for line in sys.stdin if line.strip()]
        except UnicodeDecodeError as err:
            raise SystemExit(f"stdin: not UTF-8 text ({err.reason})") from None
    check_unicode(prompts or [], "--prompt" if args.prompt else "--prompts" if args.prompts else "stdin")
    use_feedback = args.feedback
    model, tokenizer = load_agents_or_fresh(args.model, args.adapters)
    session = Session()
    prefix_cache = {}  # the agents' system-prompt keys/values, computed once for this process (adapters are fixed)
    try:
        if prompts is None:
            interactive(model, tokenizer, config, use_feedback, args.show_feedback, session, prefix_cache)
        else:
            for start in range(0, len(prompts), args.batch_size):
                chunk = prompts[start:start + args.batch_size]
                replies = answer_prompts(model, tokenizer, chunk, config, use_feedback, prefix_cache)
                for prompt, reply in zip(chunk, replies):
                    session.add(reply)
                    print(f">>> {prompt}\n{format_reply(reply, args.show_feedback, use_feedback)}\n", flush=True)
    except KeyboardInterrupt:
        print("\n(interrupted)")
    print(session.summary(use_feedback))
    return 0


if __name__ == "__main__":
    sys.exit(main())
