"""Answer extraction and verification, per domain (selfdistill.tasks.verify)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fakesandbox import install_fake_sandbox  # tests/fakesandbox.py

from selfdistill.tasks.base import Item
from selfdistill.tasks.verify import (
    as_number,
    build_program,
    extract_choice,
    extract_code,
    extract_math_answer,
    last_boxed,
    math_equal,
    verify_code,
    verify_item,
    verify_math,
    verify_mcqa,
    verify_output,
)

# ---------------------------------------------------------------- fake sandbox


@pytest.fixture
def fake_sandbox(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Install the fake sandbox; returns the list of programs it ran."""
    return install_fake_sandbox(monkeypatch)


# ---------------------------------------------------------------- math

@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 9*2 = 18\n#### 18", "18"),
        ("#### 18\nDone.", "18"),
        ("#### \\boxed{12}", "12"),
        ("#### $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("x \\boxed{\\frac{3}{4}} ok", "\\frac{3}{4}"),
        ("\\boxed{3} first, then \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\fbox{7}", "7"),
        ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("The answer is 3.5. So we are done", "3.5"),
        ("I get 5 apples, then 7 pears", "7"),
        ("it costs 1,200 in all", "1200"),
        ("\\boxed{3} but later #### 4", "4"),  # the marker wins
        ("\\boxed{1+{2}", "2"),  # cut-off box: falls back to the last number
        ("no answer at all", None),
        ("####", None),
        ("", None),
    ],
)
def test_extract_math_answer(text: str, expected: str | None) -> None:
    assert extract_math_answer(text) == expected


def test_last_boxed_forms() -> None:
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("$\\boxed 5$") == "5"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None


@pytest.mark.parametrize(
    "text, value",
    [("18", 18), ("18.0", 18), ("+5", 5), ("-3/4", -0.75), ("1,000", 1000), ("$5", 5), ("\\$5.", 5),
     ("1,2", None), ("1_000", None), ("5/0", None), ("x", None), ("3/4.5", None)],
)
def test_as_number(text: str, value: float | None) -> None:
    got = as_number(text)
    assert (got is None) if value is None else (got == pytest.approx(value))


@pytest.mark.parametrize(
    "completion, answer, ok",
    [
        ("She makes 18 dollars.\n#### 18", "18", True),
        ("#### 18.0", "18", True),
        ("#### 17", "18", False),
        ("#### $18", "18", True),
        ("#### 18 dollars", "18", True),
        ("#### 1,000", "1000", True),
        ("#### 15000", "15,000", True),
        ("#### +5", "5", True),
        ("#### -5", "5", False),
        ("#### 3/4", "0.75", True),
        ("#### 0.75", "3/4", True),
        ("#### 0.75", "\\frac{3}{4}", True),
        ("#### 0.7", "\\frac{3}{4}", False),
        ("so \\boxed{\\frac{3}{4}}", "\\frac{3}{4}", True),
        ("so \\boxed{\\dfrac34}", "\\frac{3}{4}", True),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
        ("\\boxed{2\\sqrt{3}}", "2\\sqrt{2}", False),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", True),
        ("\\boxed{x^2+1}", "1+x^2", True),
        ("\\boxed{\\{1, -1\\}}", "\\{-1, 1\\}", True),
        ("The answer is 42.", "42", True),
        ("I get 5 then 7", "7", True),
        ("I get 5 then 7", "5", False),
        ("no answer here", "7", False),
        ("", "7", False),
        ("#### 5/0", "5", False),
        ("#### \\frac{{{", "1", False),
        ("#### " + "x+" * 400 + "1", "1", False),  # too long for sympy: rejected
        ("#### 7", "", False),
    ],
)
def test_verify_math(completion: str, answer: str, ok: bool) -> None:
    assert verify_math(completion, answer) is ok


@pytest.mark.parametrize("junk", ["\\", "}{", "\\frac{", "$$", "\\left(", "^^^", "1/0", "\\sqrt{-}", "(((", "\\boxed{}", "\x00"])
def test_math_equal_never_raises(junk: str) -> None:
    assert math_equal("1", junk) is False
    assert math_equal(junk, "\\frac{1}{2}") in (True, False)


def test_math_verify_off_main_thread() -> None:
    """SIGALRM timeouts only work on the main thread; elsewhere we still answer."""
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_equal, "\\frac{3}{4}", "0.75").result() is True
        assert pool.submit(math_equal, "\\frac{3}{4}", "0.5").result() is False


# ---------------------------------------------------------------- mcqa

@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### B", "B"),
        ("#### (c)", "C"),
        ("#### B) Paris", "B"),
        ("#### Berlin", None),
        ("#### E", None),
        ("The answer is (B).", "B"),
        ("the answer is: [d]", "D"),
        ("Answer: D", "D"),
        ("The correct option is C because ...", "C"),
        ("I think C is right.\nAnswer: A", "A"),
        ("\\boxed{C}", "C"),
        ("\\boxed{\\text{(A)}}", "A"),
        ("B", "B"),
        ("Reasoning...\n(b)", "B"),
        ("Reasoning...\nC.", "C"),
        ("The answer is a prime number", None),  # article "a" is not an option
        ("It is hard to say.", None),
        ("", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text) == expected


def test_extract_choice_respects_letters() -> None:
    assert extract_choice("#### E", "ABCDE") == "E"
    assert extract_choice("Answer: C", "AB") is None
    assert extract_choice("Answer: b", ["a", "b"]) is None  # lower case needs parentheses
    assert extract_choice("Answer: (b)", ["a", "b"]) == "B"


@pytest.mark.parametrize(
    "completion, answer, ok",
    [("#### B", "B", True), ("#### b", "B", True), ("#### B", "b", True), ("#### (B)", "(B)", True),
     ("#### C", "B", False), ("no letter", "B", False), ("The answer is (A)", "A", True)],
)
def test_verify_mcqa(completion: str, answer: str, ok: bool) -> None:
    assert verify_mcqa(completion, answer) is ok


# ---------------------------------------------------------------- code: output prediction

@pytest.mark.parametrize(
    "completion, expected, ok",
    [
        ("The loop prints 3.\n#### 3", "3", True),
        ("#### 3\nbecause x is 3", "3", True),
        ("####   hello    world  ", "hello world", True),
        ("#### 3\n4", "3\n4", True),
        ("#### 3\n5", "3\n4", False),
        ("#### 3", "3\n4", False),
        ("####\n```\n1 2\n3\n```\nok", "1 2\n3", True),
        ("#### 4", "3", False),
        ("3", "3", False),  # no marker
        ("#### ", "3", False),
    ],
)
def test_verify_output(completion: str, expected: str, ok: bool) -> None:
    assert verify_output(completion, expected) is ok


# ---------------------------------------------------------------- code: generation

def test_extract_code() -> None:
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1"
    fenced = "Here:\n```python\ndef f():\n    return 1\n```\nUsage:\n```python\nprint(f())\n```"
    assert extract_code(fenced) == "def f():\n    return 1"
    two = "```python\ndef g(): pass\n```\n```python\ndef f(): return 2\n```"
    assert extract_code(two, entry_point="g") == "def g(): pass"
    assert extract_code(two) == "def f(): return 2"
    assert extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_code("```py\ndef f(): return 3") == "def f(): return 3"  # cut-off fence


MBPP = Item("mbpp-1", "Write add.", "", "", "code",
            {"kind": "tests", "tests": "assert add(1, 2) == 3\nassert add(0, 0) == 0", "entry_point": "add"})
HE_PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
HUMANEVAL = Item("he-1", "Complete.", "", "", "code",
                 {"kind": "humaneval", "entry_point": "total", "code_prompt": HE_PROMPT,
                  "tests": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"})


def test_build_program_humaneval_body_and_full_function() -> None:
    body = build_program(HUMANEVAL, "    return sum(xs)")
    assert body.startswith("from typing import List") and body.rstrip().endswith("check(total)")
    assert HE_PROMPT + "    return sum(xs)" in body
    full = build_program(HUMANEVAL, "def total(xs):\n    return sum(xs)")
    assert full.startswith("from typing import List") and '"""Sum of xs."""' not in full


def test_build_program_needs_tests() -> None:
    with pytest.raises(ValueError, match="no meta\\['tests'\\]"):
        build_program(Item("x", "p", "", "", "code", {"kind": "tests"}), "pass")


@pytest.mark.parametrize(
    "item, completion, ok",
    [
        (MBPP, "```python\ndef add(a, b):\n    return a + b\n```", True),
        (MBPP, "def add(a, b):\n    return a - b", False),
        (MBPP, "```python\ndef add(a, b) return\n```", False),  # syntax error
        (MBPP, "I cannot do this.", False),
        (MBPP, "", False),
        (HUMANEVAL, "```python\n    return sum(xs)\n```", True),
        (HUMANEVAL, "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```", True),
        (HUMANEVAL, "```python\ndef total(xs):\n    return len(xs)\n```", False),
    ],
)
def test_verify_code(fake_sandbox: list[str], item: Item, completion: str, ok: bool) -> None:
    assert verify_code(item, completion) is ok


def test_verify_code_timeout(fake_sandbox: list[str]) -> None:
    loop = "def add(a, b):\n    while True:\n        pass"
    assert verify_code(MBPP, loop, timeout_s=0.5) is False


def test_verify_code_real_sandbox() -> None:
    """The real sandbox, once it exists (written separately)."""
    pytest.importorskip("selfdistill.tasks.sandbox")
    assert verify_code(MBPP, "def add(a, b):\n    return a + b") is True
    assert verify_code(MBPP, "def add(a, b):\n    return a * b") is False
    assert verify_code(HUMANEVAL, "    return sum(xs)\n") is True


RIGHT = {"add": "def add(a, b):\n    return a + b\n", "total": "def total(xs):\n    return sum(xs)\n"}
WRONG = {"add": "def add(a, b):\n    return a - b\n", "total": "def total(xs):\n    return len(xs)\n"}
# Ways to end a wrong program early with status 0 (or to dodge its tests); ENTRY is the function's name.
EARLY_EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "exit()": "exit()",
    "quit()": "quit()",
    "raise SystemExit": "raise SystemExit",
    "raise SystemExit(0)": "raise SystemExit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "exit inside the function": "def ENTRY(*args):\n    raise SystemExit(0)",
    "os._exit inside the function": "def ENTRY(*args):\n    import os\n    os._exit(0)",
    "kill own process group": "import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)",
    "kill own process": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "SIGTERM handler exits 0": "import os, signal\nsignal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
    "os.kill(os.getpid(), signal.SIGTERM)",
    "thread exits 0 once the runner fails": "import os, threading, time\n"
    "threading.Thread(target=lambda: (time.sleep(0.3), os._exit(0))).start()",
    "atexit os._exit(0)": "import atexit, os\natexit.register(os._exit, 0)",
    "override print and AssertionError": "import builtins\nbuiltins.print = lambda *a, **k: None\n"
    "builtins.AssertionError = SystemExit",
    "monkeypatched check": "def check(candidate):\n    pass\nimport builtins\nbuiltins.check = check",
    "junk on every descriptor": "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'ok' * 16)\n"
    "    except OSError:\n        pass\nos._exit(0)",
}


@pytest.mark.parametrize("item", [MBPP, HUMANEVAL], ids=["mbpp", "humaneval"])
def test_verify_code_honest_pass_and_fail(item: Item) -> None:
    pytest.importorskip("selfdistill.tasks.sandbox")
    entry = item.meta["entry_point"]
    assert verify_code(item, RIGHT[entry]) is True
    assert verify_code(item, WRONG[entry]) is False


@pytest.mark.parametrize("trick", list(EARLY_EXITS))
@pytest.mark.parametrize("item", [MBPP, HUMANEVAL], ids=["mbpp", "humaneval"])
def test_verify_code_early_exit_is_wrong(item: Item, trick: str) -> None:
    """A pass means the tests ran to their end: no early exit with status 0 is scored correct."""
    pytest.importorskip("selfdistill.tasks.sandbox")
    entry = item.meta["entry_point"]
    completion = "```python\n" + WRONG[entry] + EARLY_EXITS[trick].replace("ENTRY", entry) + "\n```"
    assert verify_code(item, completion) is False


# ---------------------------------------------------------------- dispatch

def test_verify_item_dispatch(fake_sandbox: list[str]) -> None:
    math = Item("m", "p", "", "0.5", "math")
    assert verify_item(math, "#### 1/2") and not verify_item(math, "#### 2")
    mc = Item("q", "p", "", "E", "mcqa", {"letters": "ABCDE"})
    assert verify_item(mc, "#### E") and not verify_item(Item("q", "p", "", "E", "mcqa"), "#### E")
    out = Item("o", "p", "", "3\n4", "code", {"kind": "output"})
    assert verify_item(out, "#### 3\n4") and not verify_item(out, "#### 3 4")
    assert verify_item(Item("o2", "p", "", "7", "code"), "#### 7")  # no tests: output prediction
    toy = Item("toy", "p", "", "-6", "code", {"kind": "code_output", "program": "print(-6)", "tests": "ignored"})
    assert verify_item(toy, "c = -6\n#### -6") and not fake_sandbox
    assert verify_item(MBPP, "def add(a, b):\n    return a + b") and len(fake_sandbox) == 1
    untyped = Item("t", "p", "", "", "code", {"tests": "assert f() == 1"})  # tests without a kind
    assert verify_item(untyped, "def f():\n    return 1")
    with pytest.raises(ValueError, match="unknown domain 'chess'"):
        verify_item(Item("c", "p", "", "e4", "chess"), "e4")


def test_toy_world_solutions_verify() -> None:
    """Every toy item's own reference solution passes its verifier; a wrong answer does not."""
    toy = pytest.importorskip("selfdistill.toy.tasks")
    for domain in ("math", "code", "mcqa"):
        for item in toy.ToyTask(domain, seed=0, train_size=20, test_size=20).items("test_ood"):
            assert verify_item(item, item.solution), item
            assert not verify_item(item, "#### 123456789"), item
