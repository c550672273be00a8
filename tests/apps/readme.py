"""The README's examples, for the tests that run them.

A fenced block preceded by ``<!-- file: NAME -->`` is a file of an example (a
gunicorn.conf.py, an app); :func:`run_snippet` runs a Python block statement by
statement and checks every expression whose comment starts with a Python literal
(``cache.get("greeting")   # 'hello'``, ``cache.add(...)   # False: already there``).
"""
import ast
import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def section(title):
    """The text of the README section ``## title`` (up to the next ``## ``)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise AssertionError(f"README has no section {title!r}")
    return match.group(1)


def blocks(text):
    """[(file name or None, language, code)] of the fenced blocks of ``text``."""
    pattern = re.compile(r"(?:<!-- file: (\S+) -->\n)?```(\w*)\n(.*?)^```", re.M | re.S)
    return [(m.group(1), m.group(2), m.group(3)) for m in pattern.finditer(text)]


def files(title):
    """{file name: code} of the example files of a section."""
    return {name: code for name, _, code in blocks(section(title)) if name}


def python_blocks(title):
    """The Python blocks of a section that are not example files."""
    return [code for name, lang, code in blocks(section(title)) if lang == "python" and not name]


def _expected(comment):
    """The literal a comment starts with (``# 'hello'``, ``# False: ...``), or None."""
    text = comment.lstrip("#").strip()
    for head in (text, text.split(": ", 1)[0]):
        try:
            return (ast.literal_eval(head),)
        except (ValueError, SyntaxError):
            continue
    return None


def run_snippet(code, namespace):
    """Run ``code`` one statement at a time in ``namespace``, checking the values that
    the comments announce; returns the namespace."""
    comments = {tok.start[0]: tok.string
                for tok in tokenize.generate_tokens(io.StringIO(code).readline)
                if tok.type == tokenize.COMMENT}
    for node in ast.parse(code).body:
        if isinstance(node, ast.Expr):
            value = eval(compile(ast.Expression(node.value), "<README>", "eval"), namespace)
            comment = comments.get(node.end_lineno)
            expected = _expected(comment) if comment else None
            if expected is not None:
                line = code.splitlines()[node.lineno - 1]
                assert value == expected[0], f"README: {line.strip()!r} gave {value!r}"
        else:
            exec(compile(ast.Module([node], []), "<README>", "exec"), namespace)
    return namespace
