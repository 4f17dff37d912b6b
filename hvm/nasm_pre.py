"""NASM preprocessor subset: %include, %define, %assign, %if/%ifdef, comments (NASM manual ch. 4)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hvm.nasm_expr import ID_CHARS, ID_START, NUM_CHARS, ExprError, Value, evaluate, tokenize

MAX_INCLUDE_DEPTH = 32
MAX_EXPANSION_DEPTH = 64


@dataclass(frozen=True)
class SourceLine:
    file: str          # the file's name as messages show it
    line: int          # 1-based line number in that file
    text: str          # macros expanded, comment removed
    directory: Path | None = None   # where the file is (incbin looks there first)


class AsmError(Exception):
    """An error in the guest source: str(e) == "file:line: message"."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


@dataclass
class Macro:
    params: tuple[str, ...] | None   # None: no parameter list
    body: str


def strip_comment(text: str) -> str:
    """The line without its ';' comment (a ';' inside a string is data)."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == ";":
            return text[:i]
        if c in "'\"`":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if (c == "`" and text[j] == "\\") else 1
            i = j + 1
            continue
        i += 1
    return text


def read_source(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="surrogateescape")


def _quoted_end(text: str, i: int) -> int:
    c = text[i]
    j = i + 1
    while j < len(text) and text[j] != c:
        j += 2 if (c == "`" and text[j] == "\\") else 1
    return min(j + 1, len(text))


def _split_args(text: str) -> list[str]:
    args, depth, cur, i = [], 0, "", 0
    while i < len(text):
        c = text[i]
        if c in "'\"`":
            j = _quoted_end(text, i)
            cur += text[i:j]
            i = j
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        if c == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    args.append(cur.strip())
    return args


class Preprocessor:
    """Turns source text into SourceLines; include files are searched in `search` order."""

    def __init__(self, include_dirs: Sequence[Path], guests_dir: Path) -> None:
        self.include_dirs = list(include_dirs)
        self.guests_dir = guests_dir
        self.macros: dict[str, Macro] = {}
        self.out: list[SourceLine] = []

    # -- macro expansion
    def expand(self, text: str, depth: int = 0, active: frozenset[str] = frozenset()) -> str:
        if not self.macros:
            return text
        if depth > MAX_EXPANSION_DEPTH:
            raise ExprError("macro expansion too deep")
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c in "'\"`":
                j = _quoted_end(text, i)
                out.append(text[i:j])
                i = j
            elif c.isdigit() or (c == "$" and i + 1 < n and text[i + 1] in ID_CHARS):
                j = i + 1
                while j < n and text[j] in NUM_CHARS | ID_CHARS:
                    j += 1
                out.append(text[i:j])
                i = j
            elif c in ID_START:
                j = i + 1
                while j < n and text[j] in ID_CHARS:
                    j += 1
                name = text[i:j]
                macro = self.macros.get(name)
                if macro is None or name in active:
                    out.append(name)
                    i = j
                    continue
                body = macro.body
                if macro.params is not None:
                    k = j
                    while k < n and text[k] in " \t":
                        k += 1
                    if k >= n or text[k] != "(":
                        out.append(name)   # a function-like macro named without arguments
                        i = j
                        continue
                    end, depth_p = k, 0
                    while end < n:
                        if text[end] in "'\"`":
                            end = _quoted_end(text, end)
                            continue
                        if text[end] == "(":
                            depth_p += 1
                        elif text[end] == ")":
                            depth_p -= 1
                            if depth_p == 0:
                                break
                        end += 1
                    if end >= n:
                        raise ExprError(f"missing ')' in call of macro '{name}'")
                    args = _split_args(text[k + 1:end])
                    if args == [""]:
                        args = []
                    if len(args) != len(macro.params):
                        raise ExprError(f"macro '{name}' takes {len(macro.params)} "
                                        f"argument(s), {len(args)} given")
                    body = self._substitute(body, dict(zip(macro.params, args, strict=True)))
                    j = end + 1
                out.append(self.expand(body, depth + 1, active | {name}))
                i = j
            else:
                out.append(c)
                i += 1
        return "".join(out)

    @staticmethod
    def _substitute(body: str, args: dict[str, str]) -> str:
        out, i, n = [], 0, len(body)
        while i < n:
            c = body[i]
            if c in "'\"`":
                j = _quoted_end(body, i)
                out.append(body[i:j])
                i = j
            elif c in ID_START:
                j = i + 1
                while j < n and body[j] in ID_CHARS:
                    j += 1
                word = body[i:j]
                out.append(args.get(word, word))
                i = j
            else:
                out.append(c)
                i += 1
        return "".join(out)

    def _const(self, text: str) -> int:
        """A preprocessor expression: numbers and macros only (%assign, %if)."""
        def no_symbols(name: str) -> Value:
            raise ExprError(f"symbol '{name}' is not defined at preprocessing time")
        v = evaluate(tokenize(self.expand(text)), no_symbols)
        return v.n

    # -- files
    def find_include(self, name: str, including_dir: Path | None) -> Path | None:
        dirs = ([including_dir] if including_dir is not None else []) + self.include_dirs \
            + [self.guests_dir]
        for d in dirs:
            candidate = Path(d) / name
            if candidate.is_file():
                return candidate
        return None

    def run(self, text: str, name: str, directory: Path | None, depth: int = 0) -> None:
        """Preprocess `text` (a file called `name` in `directory`), appending to self.out."""
        lines = text.split("\n")
        # Conditional stack: (this branch is active, some branch was taken, parent active)
        conds: list[tuple[bool, bool, bool]] = []
        i = 0
        while i < len(lines):
            number = i + 1
            raw = lines[i].rstrip("\r")
            i += 1
            while raw.endswith("\\") and i < len(lines):   # line continuation
                raw = raw[:-1] + lines[i].rstrip("\r")
                i += 1
            code = strip_comment(raw).strip()
            active = all(c[0] for c in conds)

            def fail(message: str, number: int = number) -> AsmError:
                return AsmError(name, number, message)

            if code.startswith("%") and len(code) > 1 and code[1] not in "%$0123456789":
                head = code.split(None, 1)
                word, rest = head[0].lower(), (head[1].strip() if len(head) > 1 else "")
                try:
                    if word in ("%if", "%ifdef", "%ifndef", "%ifidn", "%ifidni"):
                        if not active:
                            conds.append((False, True, False))
                        else:
                            cond = self._condition(word, rest, fail)
                            conds.append((cond, cond, True))
                        continue
                    if word in ("%elif", "%elifdef", "%elifndef", "%else"):
                        if not conds:
                            raise fail(f"'{word}' without '%if'")
                        _, taken, parent = conds[-1]
                        if not parent or taken:
                            conds[-1] = (False, True, parent)
                        else:
                            cond = True if word == "%else" else \
                                self._condition("%if" + word[5:], rest, fail)
                            conds[-1] = (cond, cond, parent)
                        continue
                    if word == "%endif":
                        if not conds:
                            raise fail("'%endif' without '%if'")
                        conds.pop()
                        continue
                    if not active:
                        continue
                    self._directive(word, rest, name, directory, depth, fail)
                except ExprError as e:
                    raise fail(str(e)) from None
                continue
            if not active or not code:
                continue
            try:
                expanded = self.expand(code)
            except ExprError as e:
                raise fail(str(e)) from None
            self.out.append(SourceLine(name, number, expanded, directory))
        if conds:
            raise AsmError(name, len(lines), "'%if' without '%endif'")

    def _condition(self, word: str, rest: str, fail: Callable[..., AsmError]) -> bool:
        if word in ("%ifdef", "%ifndef"):
            if not rest:
                raise fail(f"'{word}' needs a macro name")
            return (rest.split()[0] in self.macros) == (word == "%ifdef")
        if word in ("%ifidn", "%ifidni"):
            a, _, b = self.expand(rest).partition(",")
            a, b = a.strip(), b.strip()
            return a.lower() == b.lower() if word == "%ifidni" else a == b
        return self._const(rest) != 0

    def _directive(self, word: str, rest: str, name: str, directory: Path | None, depth: int,
                   fail: Callable[..., AsmError]) -> None:
        if word in ("%define", "%xdefine", "%idefine", "%xidefine"):
            if not rest:
                raise fail(f"'{word}' needs a macro name")
            j = 0
            while j < len(rest) and rest[j] in ID_CHARS:
                j += 1
            macro_name = rest[:j]
            if not macro_name or macro_name[0] not in ID_START:
                raise fail(f"bad macro name in '{word}'")
            params: tuple[str, ...] | None = None
            body = rest[j:]
            if body.startswith("("):
                close = body.find(")")
                if close < 0:
                    raise fail("missing ')' in macro parameter list")
                params = tuple(p.strip() for p in body[1:close].split(",") if p.strip())
                body = body[close + 1:]
            body = body.strip()
            if word.startswith("%x"):
                body = self.expand(body)
            self.macros[macro_name] = Macro(params, body)
        elif word == "%undef":
            self.macros.pop(rest.split()[0] if rest else "", None)
        elif word in ("%assign", "%iassign"):
            parts = rest.split(None, 1)
            if len(parts) != 2:
                raise fail("'%assign' needs a name and a value")
            self.macros[parts[0]] = Macro(None, str(self._const(parts[1])))
        elif word == "%include":
            self._include(rest, name, directory, depth, fail)
        elif word == "%error":
            raise fail(rest.strip("'\"`") or "%error")
        elif word in ("%warning", "%pragma", "%line"):
            pass
        elif word in ("%macro", "%imacro", "%rep", "%endmacro", "%endrep", "%rmacro"):
            raise fail(f"'{word}' is not supported (use %define or plain code with labels)")
        else:
            raise fail(f"unknown directive '{word}'")

    def _include(self, rest: str, name: str, directory: Path | None, depth: int,
                 fail: Callable[..., AsmError]) -> None:
        target = rest.strip()
        if len(target) >= 2 and (target[0] in "'\"" and target[-1] == target[0]
                                 or target[0] == "<" and target[-1] == ">"):
            target = target[1:-1]
        elif not target:
            raise fail("'%include' needs a file name")
        if depth >= MAX_INCLUDE_DEPTH:
            raise fail("includes nested too deeply (an include loop?)")
        found = self.find_include(target, directory)
        if found is None:
            raise fail(f"include file '{target}' not found")
        try:
            text = read_source(found)
        except OSError as e:
            raise fail(f"cannot read include file '{target}': {e.strerror}") from None
        self.run(text, os.path.basename(found), found.parent, depth + 1)
