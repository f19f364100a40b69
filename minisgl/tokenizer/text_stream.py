"""Incremental detokenization with stop strings (introduced in chapter 02).

Text is handed out as it is produced. Two details make that correct: a token can end in the middle of
a multi-byte UTF-8 character (tokenizers' ``DecodeStream`` holds such bytes back), and text that might
be the beginning of a stop string must be held back until we know.

The complete server also stops on regular expressions (SGLang's ``stop_regex``), with the same rules: the
text is cut before the match, and a tail that a pattern has begun to match is held back. The ``regex``
package (a dependency of transformers) says so: a *partial* match is one that reaches the end of the text
and could become a match with more of it, which Python's ``re`` cannot tell.
"""

import regex
from tokenizers.decoders import DecodeStream

# The longest a stop pattern may search the text for one token, in seconds: a pattern that backtracks
# without end (``(a+)+b``) raises ``TimeoutError``, and the detokenizer ends its request alone, with an error.
REGEX_TIMEOUT = 0.05


# --8<-- [start:text-stream]
class TextStream:
    """Turns token ids into text, one token at a time, and watches for stop strings.

    ``add`` returns the text that is now safe to show and whether a stop string was found. Text after
    a stop string is never returned, nor is the stop string itself.
    """

    def __init__(self, tokenizer, stop: list[str], stop_regex: list[str] = ()):
        self.backend = tokenizer.backend_tokenizer
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.patterns = [regex.compile(pattern) for pattern in stop_regex]  # the API server compiled them once
        self.text = ""  # everything decoded so far
        self.sent = 0  # how many characters of it were handed out
        self.matched: str | None = None  # the stop string (or pattern) that ended it, once one did
        self.matched_text: str | None = None  # the text it matched: the stop string, or what the pattern matched

    def add(self, token_id: int) -> tuple[str, bool]:
        self.text += self.decoder.step(self.backend, token_id) or ""  # None: waiting for more bytes
        hits = [(i, s, s) for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
        hits += [(m.start(), p.pattern, m.group()) for p in self.patterns
                 if (m := p.search(self.text, self.sent, timeout=REGEX_TIMEOUT)) is not None]
        if hits:
            at, self.matched, self.matched_text = min(hits)
            return self._release(at), True
        return self._release(len(self.text) - max(self._held(), self._held_by_patterns())), False

    def _held(self) -> int:
        """The length of the longest tail of the text that could still grow into a stop string.

        Such a tail lies in the unsent text: had it begun in text already sent, that text would have
        been held back then. So only the starts in the unsent text are tried, longest tail first, and
        most are rejected at their first character: the work is in proportion to the text not yet
        sent (the new text and what was held), not to the square of a stop string's length, as it
        would be if every prefix of every stop string were tried. (A tail as long as a stop string
        cannot be a beginning of it: ``find`` above would have found it.)
        """
        unsent = self.text[self.sent :]
        for start in range(len(unsent)):
            if any(s.startswith(unsent[start:]) for s in self.stop):
                return len(unsent) - start
        return 0

    def _held_by_patterns(self) -> int:
        """The length of the tail that a stop pattern has begun to match (none matches whole: ``add`` looked).
        The search starts in the unsent text, as ``_held``'s does, and sees the text before it (``^``, ``\\b``
        and lookbehinds read it)."""
        starts = [m.start() for p in self.patterns
                  if (m := p.search(self.text, self.sent, partial=True, timeout=REGEX_TIMEOUT)) is not None]
        return len(self.text) - min(starts) if starts else 0

    def flush(self) -> str:
        """The rest of the text, once generation has ended for another reason."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return piece
# --8<-- [end:text-stream]
