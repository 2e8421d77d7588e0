"""
Multi-turn domains: an Environment plays one episode of an example, turn by turn.

    env = tasks.make_env(example)        # the domain's Environment (tasks.ENVIRONMENTS), one per episode
    messages = env.reset()               # the prompt messages (tasks.prompt_messages(example) for RL / eval rows)
    observations, done, reward = env.step(response)   # one assistant turn's text, as the sampler decodes it

`response` is the template's opener ("<think>\\n") and the sampled text, the stop token removed. Until the episode
is done, `observations` are the environment's reply: "tool" messages (the chat template renders consecutive ones
in one user turn, each inside <tool_response>), which the caller appends to the conversation before sampling the
next turn. Once done, `observations` is [] and `reward` (in [0, 1]) grades the episode; before, reward is 0.0.

What every environment does the same way:
- a thinking response that never closes </think> ends the episode with reward 0;
- what the response does wrong (an unknown tool, a bad argument, markup that does not parse, a test that fails)
  never raises: the environment answers with an observation saying what went wrong, or ends the episode with
  reward 0 where it says so (tasks/swe.py: a malformed patch);
- the caller counts the turns: an episode that reaches its max_turns (the class's, or the example's "max_turns")
  without being done scores 0; step() does not check it, so a caller may give an episode more turns.

The rewards depend only on what the environment executed (the state it ended in, the tests it ran), never on the
text of the calls. One Environment holds one episode's state and nothing shared: different environments may be
stepped in parallel threads. Domains: tasks/agent.py (a tiny warehouse operated through tools) and tasks/swe.py
(repair a tiny Python project by patches, tested in the sandbox).
"""

from .core import ExampleError, prompt_messages


class Environment:
    """One episode of a multi-turn domain. Subclasses: tasks/agent.py, tasks/swe.py."""

    max_turns: int = 4  # assistant turns per episode (class default; an example may override with "max_turns")

    def __init__(self, example: dict):
        self.example = example
        self.max_turns = int(example.get("max_turns") or type(self).max_turns)
        self.reset()

    def reset(self) -> list[dict]:
        """The episode's prompt messages (those before the first assistant turn: for an RL or evaluation row, the
        example's messages; for an SFT row, which holds a whole conversation, its start), the state reset."""
        self.turns, self.done = 0, False
        self._reset()
        messages = prompt_messages(self.example)
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        return [dict(m) for m in messages[:first]]

    def step(self, response: str) -> tuple[list[dict], bool, float]:
        """One assistant turn -> (observations, done, reward); see the module docstring."""
        if self.done:
            raise RuntimeError("step() after the episode ended: reset() starts a new one")
        if not isinstance(response, str):
            raise TypeError(f"step: the response must be the decoded text (str), got {type(response).__name__}")
        self.turns += 1
        observations, done, reward = self._step(response)
        self.done = bool(done)
        if done:
            return [], True, float(reward)
        return [{"role": "tool", "content": text} for text in observations], False, 0.0

    # what a domain defines
    def _reset(self):
        """Rebuild the episode's state from self.example."""
        raise NotImplementedError

    def _step(self, response: str):
        """(observation texts, done, reward) for one turn."""
        raise NotImplementedError


def check_max_turns(example: dict, where: str):
    """The optional "max_turns" field of a multi-turn example: a positive integer."""
    turns = example.get("max_turns")
    if turns is not None and (isinstance(turns, bool) or not isinstance(turns, int) or not 1 <= turns <= 64):
        raise ExampleError(where, "max_turns", f"expected an integer from 1 to 64, got {turns!r:.40}")


def make_env(example: dict, **options) -> Environment:
    """The Environment of the example's domain (tasks.ENVIRONMENTS), for one episode; options go to its class
    (tasks/swe.py takes `limits`, the sandbox's SandboxLimits). ValueError for a domain without one."""
    from . import ENVIRONMENTS
    cls = ENVIRONMENTS.get(example.get("domain") if isinstance(example, dict) else None)
    if cls is None:
        domain = example.get("domain") if isinstance(example, dict) else example
        raise ValueError(f"no environment for domain {domain!r} (multi-turn domains: {', '.join(ENVIRONMENTS)})")
    return cls(example, **options)
