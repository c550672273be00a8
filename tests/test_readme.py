"""The README's "Using Vela" example runs as written, and every line whose comment
starts with a value returns that value: the documentation cannot drift."""
import ast
import os
import re
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _using_vela_block():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Using Vela", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _expected(comment):
    """The value a comment announces ('# 2: entries removed' -> 2), or a sentinel."""
    for i in range(len(comment), 0, -1):
        if i == len(comment) or comment[i] in ":;( ":
            try:
                return ast.literal_eval(comment[:i].strip())
            except (ValueError, SyntaxError):
                continue
    return _expected


def test_using_vela_example_runs_and_returns_what_its_comments_say():
    name = f"readme{uuid.uuid4().hex[:10]}"
    code = _using_vela_block().replace('"shop"', repr(name))
    lines = code.splitlines()
    tree = ast.parse(code)
    env = {}
    checked = 0
    try:
        for stmt in tree.body:
            src = ast.get_source_segment(code, stmt)
            line = lines[stmt.end_lineno - 1]
            comment = line.split("#", 1)[1].strip() if "#" in line and stmt.lineno == stmt.end_lineno else ""
            if isinstance(stmt, ast.Expr) and comment:
                value = eval(compile(ast.Expression(stmt.value), "README", "eval"), env)
                want = _expected(comment)
                if want is not _expected:
                    assert value == want, f"{src!r} gave {value!r}, the README says {comment!r}"
                    checked += 1
            else:
                exec(compile(ast.Module([stmt], []), "README", "exec"), env)
    finally:
        import vela

        vela.destroy(name)
    assert checked >= 12, checked  # the lines with a value in their comment
