"""Constrained decoding: a grammar per constrained request, and the token mask it puts on the logits
(added to the complete server, after chapter 06, for the OpenAI surface real clients use).

A client that asks for JSON (``response_format``), for text matching a regular expression or an EBNF
grammar (SGLang's ``regex`` and ``ebnf``), or for a tool call, must get text of that shape whatever the
model would rather say. The way to guarantee it is to never let the model pick a token that would
break the shape:

1. **Compile** the constraint, once per distinct constraint, into a grammar over the model's tokens.
   xgrammar, the engine SGLang uses by default, turns a JSON schema or a regex into a context-free
   grammar and precomputes, for each state of its pushdown automaton, which tokens are always,
   never or only sometimes allowed: most of the vocabulary is decided before any request runs.
2. **Mask**, every step, in the sampling step: the request's matcher (where it is in the grammar)
   fills a bitmask of the tokens that may come next (1 bit per token), and every other token's logit
   becomes -inf. Sampling (greedy or not) then can only choose an allowed token; temperature, top-k
   and top-p work as always on what is left.
3. **Advance**: the scheduler feeds the chosen token to the matcher. When the grammar is complete, only
   the end-of-sequence token is allowed, and the request stops.

The scheduler sees all of this through one small seam, ``GrammarManager``: it hands over a constrained
request on arrival (``add``), takes back the ones whose grammar is ready at the start of each step
(``ready``), asks for the step's mask (``mask_for``) and advances a matcher with each token (``accept``).
Compiling, the requests that wait for it and the matchers are the manager's business.

The mask is applied where tokens are chosen, after the forward pass and before sampling, because it
depends on every token chosen so far: it cannot be known before the previous step's token is. Under
tensor parallelism every rank holds the same matchers and applies the same masks, so the ranks still
sample the same tokens.
"""

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch
import xgrammar as xgr

logger = logging.getLogger(__name__)

CONSTRAINT_KINDS = ("json_object", "json_schema", "regex", "ebnf")


class GrammarError(ValueError):
    """A constraint that does not compile: a malformed schema, regex or grammar."""


class Grammars:
    """Compiles constraints into grammars for one model's vocabulary, and keeps the most recent ones."""

    def __init__(self, model_path, vocab_size: int, eos_ids: set[int], keep: int = 256):
        self.model_path, self.vocab_size, self.eos_ids = model_path, vocab_size, sorted(eos_ids)
        self.keep = keep
        self.compiled: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self.pending: dict[tuple[str, str], Future] = {}  # compiles on a thread not yet taken by the scheduler
        self.compiles = 0  # how many constraints were compiled (not found among the kept ones)
        self._compiler = None

    def compiler(self) -> xgr.GrammarCompiler:
        """Made on the first constrained request: a server that never sees one never pays for it."""
        if self._compiler is None:
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(self.model_path)
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.eos_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # we keep our own
        return self._compiler

    # --8<-- [start:compile]
    def compile_later(self, constraint: tuple[str, str], pool: ThreadPoolExecutor | None) -> Future:
        """The constraint's grammar, as a future: done at once if it is kept (or there is no ``pool``, then it
        is compiled here), else compiled on ``pool``'s thread; a constraint already being compiled is not
        compiled twice. Its result (or its GrammarError) goes to ``matcher``."""
        constraint = tuple(constraint)
        if constraint in self.compiled or pool is None:
            done = Future()
            try:
                done.set_result(self.compiled[constraint] if constraint in self.compiled else self.compile(*constraint))
            except Exception as error:  # a GrammarError, or anything else the grammar engine raised
                done.set_exception(error)
            return done
        if constraint not in self.pending:
            self.pending[constraint] = pool.submit(self.compile, *constraint)
        return self.pending[constraint]

    def matcher(self, constraint: tuple[str, str], compiled: "xgr.CompiledGrammar") -> xgr.GrammarMatcher:
        """A fresh matcher (the start of the grammar) for one request; the grammar is kept for the next."""
        constraint = tuple(constraint)
        self.compiled[constraint] = compiled
        self.compiled.move_to_end(constraint)
        if len(self.compiled) > self.keep:
            self.compiled.popitem(last=False)
        matcher = xgr.GrammarMatcher(compiled)
        if not allows_anything(matcher, self.vocab_size):
            raise GrammarError(f"the {constraint[0].replace('_', ' ')} allows no reply at all")
        return matcher

    def compile(self, kind: str, spec: str) -> xgr.CompiledGrammar:
        compiler = self.compiler()
        self.compiles += 1
        try:
            # No free whitespace between JSON tokens: a small model left free to add spaces may add them forever.
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "json_schema":
                return compiler.compile_json_schema(spec, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(spec)
            if kind == "ebnf":
                return compiler.compile_grammar(spec)
        except RuntimeError as error:
            raise GrammarError(f"the {kind.replace('_', ' ')} does not compile: {plain_message(error)}") from None
        raise GrammarError(f"unknown constraint {kind!r}; expected one of {', '.join(CONSTRAINT_KINDS)}")
    # --8<-- [end:compile]


def allows_anything(matcher: xgr.GrammarMatcher, vocab_size: int) -> bool:
    """Whether a fresh matcher allows at least one token (``[^\\s\\S]`` allows none: refused, not run)."""
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    return bool(bitmask.any())


def plain_message(error: Exception) -> str:
    """xgrammar's C++ message without its timestamp, source file and assertion text."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)
    return re.sub(r"^Check failed: \(.*?\) is false:\s*", "", text)


# --8<-- [start:mask]
def apply_grammar_masks(logits: torch.Tensor, matchers: list) -> None:
    """Set to -inf, in place, the logit of every token that request i's grammar forbids next.

    ``logits`` [requests, vocab]; ``matchers[i]`` is request i's matcher, or None (unconstrained).
    """
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    bitmask = xgr.allocate_token_bitmask(len(rows), logits.shape[-1])
    for i, row in enumerate(rows):
        matchers[row].fill_next_token_bitmask(bitmask, i)
    # A dead end (no token allowed) is left free: its token is refused.
    alive = bitmask.ne(0).any(dim=-1).tolist()
    forbidden = ~unpack_bits(bitmask.to(logits.device), logits.shape[-1])
    if len(rows) == len(matchers) and all(alive):
        logits.masked_fill_(forbidden, float("-inf"))  # every row constrained: one operation
        return
    for i, row in enumerate(rows):
        if alive[i]:
            logits[row].masked_fill_(forbidden[i], float("-inf"))


def unpack_bits(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[requests, words] int32, token t's bit at bit t % 32 of word t // 32 -> [requests, vocab] bool.

    (xgrammar's own ``apply_token_bitmask_inplace`` does this with the masking, token by token, on a CPU,
    and slows down with the number of tokens it forbids: at batch 8 on the default vocabulary, two tensor
    operations took 3.7 to 4.7x less time for the constraints that forbid most tokens, in
    ``benchmarks/results/grammar_cost.md``.)
    """
    # --8<-- [start:ex-bitmask]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]
    # --8<-- [end:ex-bitmask]
# --8<-- [end:mask]


# --8<-- [start:grammar-manager]
class GrammarManager:
    """The scheduler's one seam to constrained decoding: compiling, the requests waiting for it, the
    matchers and the mask.

    A large JSON schema can take seconds to compile. On one rank that happens on a thread of its own
    (``in_background``), and the running requests go on stepping meanwhile. Under tensor parallelism it
    happens at once, in ``add``: every rank must admit the same requests at the same step, and a thread
    finishes at a different moment on each rank.
    """

    def __init__(self, grammars: Grammars | None, in_background: bool = False):
        """``grammars`` None: a server without a grammar engine refuses every constrained request."""
        self.grammars = grammars
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grammar") if in_background and grammars else None
        self.compiling: list[tuple[object, Future]] = []  # (request, its grammar to be), in arrival order

    def add(self, request) -> None:
        """Start compiling a constrained request's constraint (once per distinct constraint)."""
        if self.grammars is None:
            compiled = Future()
            compiled.set_exception(GrammarError("this server runs no grammar engine"))
        else:
            compiled = self.grammars.compile_later(request.params.constraint, self.pool)
        self.compiling.append((request, compiled))

    def ready(self, idle: bool = False) -> tuple[list, list[tuple[object, str]]]:
        """The requests whose grammar is ready (each with its matcher, in ``request.grammar``), and those
        refused with why (the constraint does not compile, or allows nothing). ``idle``: nothing else
        runs, so wait a little for a compile rather than spin, with its thread, on the same cores."""
        if idle and self.compiling:
            wait([compiled for _, compiled in self.compiling], timeout=0.01, return_when=FIRST_COMPLETED)
        ready, refused = [], []
        for request, compiled in [(r, c) for r, c in self.compiling if c.done()]:
            self.compiling.remove((request, compiled))
            if self.grammars is not None:  # done: later requests look it up among the kept ones
                self.grammars.pending.pop(tuple(request.params.constraint), None)
            try:
                grammar = compiled.result()  # (raises first: its GrammarError, or "no grammar engine")
                request.grammar = self.grammars.matcher(request.params.constraint, grammar)
            except Exception as error:  # GrammarError, or anything else the grammar engine raised
                refused.append((request, str(error) if isinstance(error, GrammarError)
                                else f"the constraint failed to compile: {error}"))
            else:
                ready.append(request)
        return ready, refused

    def abort(self, uid: str):
        """Take back a request still waiting for its grammar (None if it is not here)."""
        for request, compiled in self.compiling:
            if request.uid == uid:
                self.compiling.remove((request, compiled))
                if not any(other is compiled for _, other in self.compiling):  # nobody else waits for it
                    compiled.cancel()  # (a compile already running finishes; its grammar is then dropped)
                    self.grammars.pending.pop(tuple(request.params.constraint), None)
                return request
        return None

    def drop_all(self) -> list:
        """Every request still waiting for its grammar, taken back (the server is failing)."""
        requests = [request for request, _ in self.compiling]
        self.compiling = []
        return requests

    @staticmethod
    def accept(request, token: int) -> bool:
        """Advance a constrained request's matcher by its new token; False at a dead end of its grammar (the
        constraint leads nowhere the vocabulary can go). A matcher that fails raises (the grammar engine's
        trouble, not the request's); either way the scheduler ends that request alone."""
        return request.grammar is None or request.grammar.accept_token(token)

    @staticmethod
    def mask_for(requests: list) -> Callable | None:
        """The mask of one batch's sampled rows, as a function of their logits (None: none is constrained).
        It reads each matcher when it is called, so one function serves every step of the same batch."""
        matchers = [request.grammar for request in requests]
        if all(matcher is None for matcher in matchers):
            return None
        return lambda logits: apply_grammar_masks(logits, matchers)
# --8<-- [end:grammar-manager]
