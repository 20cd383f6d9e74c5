"""The mask language: what users type after --mask, parsed into an XCR0 value.

    x87,sse,avx        exactly these components (names, aliases, groups)
    0x7                a raw XCR0 value
    no-avx512          a preset (derived from the component table), or `host`
    -avx512,-pkru      edits of the host set; removing a component also removes the
                       components that need it (-avx drops AVX-512 too)
    no-amx,+pkru       presets and edits combine, left to right

Pure module: the host's XCR0 is passed in, never read here.
"""

from __future__ import annotations

from xcr0run import PROG, xsave
from xcr0run.errors import MaskError

TYPE_CHECKING = False  # typing's import costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Iterable

_HEX_DIGITS = frozenset("0123456789abcdef")


def _is_hex(word: str) -> bool:
    """`0x` and at least one hex digit (words are lower-cased already). Not a regular
    expression: importing re costs a launcher's start-up time."""
    return word[:2] == "0x" and len(word) > 2 and _HEX_DIGITS.issuperset(word[2:])


class Preset:
    __slots__ = ("description", "name", "removes")

    def __init__(self, name: str, description: str, removes: int) -> None:
        self.name = name
        self.description = description
        self.removes = removes  # components removed from the host set (0 for `host`)

    def resolve(self, host: int) -> int:
        return host & ~xsave.dependents(self.removes)


def _removable() -> list[tuple[str, int]]:
    """User components and groups a preset may drop: everything but x87."""
    grouped = {m for members in xsave.GROUPS.values() for m in members}
    out = []
    for c in xsave.COMPONENTS:
        if c.scope == xsave.Scope.USER and c.number != 0 and c.name not in grouped:
            out.append((c.name, c.bit))
    for group in xsave.GROUPS:
        if not xsave.NAMES[group] & xsave.SUPERVISOR_BITS:
            out.append((group, xsave.NAMES[group]))
    return sorted(out, key=lambda item: item[1].bit_length())


PRESETS: dict[str, Preset] = {"host": Preset("host", "every component this machine enables", 0)}
PRESETS.update(
    (f"no-{name}", Preset(f"no-{name}", f"the host set without {name}", bits))
    for name, bits in _removable()
)


def vocabulary() -> list[str]:
    """Every word the language accepts, for suggestions and completion."""
    return [*xsave.NAMES, *PRESETS]


def suggest(word: str, candidates: Iterable[str] | None = None) -> str | None:
    import difflib  # only when something is misspelt

    pool = list(vocabulary() if candidates is None else candidates)
    close = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown(word: str) -> MaskError:
    hint = suggest(word)
    tail = f", did you mean '{hint}'?" if hint else f" (see '{PROG} --help' for the mask syntax)"
    return MaskError(f"unknown component '{word}'{tail}")


def _resolve(word: str, host: int) -> int:
    if _is_hex(word):
        return int(word, 16)
    if word in PRESETS:
        return PRESETS[word].resolve(host)
    if word in xsave.NAMES:
        return xsave.NAMES[word]
    raise _unknown(word)


def tokens(text: str) -> list[str]:
    """The words of a mask: separated by commas and white space (str.split's notion of
    white space is the one \\s has in a regular expression)."""
    return text.lower().replace(",", " ").split()


def parse_mask(text: str, host: int, supported: int | None = None) -> int:
    """Parse `text` into an XCR0 value valid on a machine whose XCR0 is `host`.

    `supported` is what the kernel could enable (defaults to `host`). Raises MaskError
    with one line naming the problem.
    """
    words = tokens(text)
    if not words:
        raise MaskError("empty mask")
    # A mask that starts with an edit edits the host set; otherwise it is built up.
    mask = host if words[0].startswith("-") else 0
    for word in words:
        if word.startswith("-"):
            drop = _resolve(word[1:], host)
            if drop & 1:
                raise MaskError("x87 must be set (XCR0 bit 0 can never be cleared)")
            mask &= ~xsave.dependents(drop)
        else:
            mask |= _resolve(word.removeprefix("+"), host)
    problems = xsave.violations(mask, host if supported is None else supported)
    if problems:
        raise MaskError(problems[0].message)
    return mask


def parse_components(text: str) -> list[tuple[str, int]]:
    """Items named as in a mask ("avx512", "avx,amx", "0xe0") with their bits, without
    the XCR0 rules: for options that name state rather than an XCR0 value."""
    words = tokens(text)
    if not words:
        raise MaskError("no components given")
    items = []
    for word in words:
        if _is_hex(word):
            items.append((word, int(word, 16)))
        elif word in xsave.NAMES:
            items.append((word, xsave.NAMES[word]))
        else:
            raise _unknown(word)
    return items


def format_mask(mask: int) -> str:
    """The canonical spelling of `mask`: components in bit order, groups collapsed."""
    words: list[str] = []
    done = 0
    for c in xsave.components(mask):
        if c.bit & done:
            continue
        group = next((g for g, members in xsave.GROUPS.items() if c.name in members), None)
        if group and mask & xsave.NAMES[group] == xsave.NAMES[group]:
            words.append(group)
            done |= xsave.NAMES[group]
        else:
            words.append(c.name)
            done |= c.bit
    rest = mask & ~done
    if rest:
        words.append(hex(rest))
    return ",".join(words) if words else "0x0"


def complete(
    incomplete: str, host: int | None = None, presets: bool = True
) -> list[tuple[str, str]]:
    """Completions for a partly typed mask: (full value, description) pairs."""
    head, _, last = incomplete.rpartition(",")
    prefix = f"{head}," if head else ""
    sign = last[:1] if last[:1] in "+-" else ""
    stem = last[len(sign) :]
    already = set(tokens(head))
    out: list[tuple[str, str]] = []
    if presets and not head and not sign:
        out += [(p.name, p.description) for p in PRESETS.values() if p.name.startswith(stem)]
    for c in xsave.COMPONENTS:
        if c.scope != xsave.Scope.USER or (host is not None and not host & c.bit):
            continue
        if sign == "-" and c.bit & 1:
            continue  # x87 can never be removed
        if c.name.startswith(stem) and sign + c.name not in already:
            out.append((prefix + sign + c.name, c.title))
    for group, members in xsave.GROUPS.items():
        gmask = xsave.NAMES[group]
        if gmask & xsave.SUPERVISOR_BITS or (host is not None and host & gmask != gmask):
            continue
        if group.startswith(stem) and sign + group not in already:
            out.append((prefix + sign + group, " + ".join(members)))
    return out
