"""The built-in offline demo task: sort a short list of digits, an imperfect teacher, the judges.

    python demo_task.py                         # a few prompts, the teacher's answers, their scores
    python demo_task.py --teacher_styles 0.8,0.15,0.05   # ... from a teacher with another style mix
    python train.py --out runs/demo             # the default DNO demo (CPU, ~35 s on 2 idle cores, offline)
    python train.py --judge demo_rps --teacher_styles 0.8,0.15,0.05 --out runs/rps   # the intransitive preset
    python compare_bt.py --out runs/cmp         # DNO vs a Bradley-Terry-reward loop, like for like
    from demo.task import make_prompt, teacher, rubric, JUDGES   # pi_1, the SFT'd Llama: demo_sft

The task stands in for the paper's instruction data (Sec. 5) at a size a CPU trains in minutes:
  prompt   "sort: 7 2 9 2\n"      (3..7 digits; demo_sft's --lengths sets the range)
  response "2 2 7 9"               (separated by " ", "," or "|": the response's *style*)
A programmatic, imperfect teacher plays GPT-4-Turbo: it writes both the SFT demonstrations and the
gold responses. On lists of 4+ digits it usually botches the tail (swaps the last two digits: score
5, or moves the largest one two places left: score 4), one late decision that a student imitates
faithfully. The student is a tiny Llama (model.py) fine-tuned on the teacher's demonstrations
(demo_sft.py), mistakes included, so it starts level with the teacher; DNO's own samples + the
judge then find the answers that beat the teacher's and move the policy there.

Judges (signature `fn(prompt, candidates)` of oracle.py):
  demo         additive 6-point rubric per candidate (as the paper's listwise GPT-4 judge):
               {"scores": [...]}
    +1 format   digits joined by one consistent separator
    +1 count    as many digits as the prompt
    +1 multiset the same digits as the prompt
    +3 order    3 - min(3, #inversions), only when the count is right
  demo_cyclic  pairwise P(y > y') = sigmoid(2 * (rubric(y) - rubric(y')) + 1.5 * cycle(style(y),
               style(y'))) where the styles beat each other in a cycle: " " > "," > "|" > " ". It is
               intransitive (A > B > C > A among equally correct answers), so no Bradley-Terry
               reward can express it.
  demo_rps     pairwise P(y > y') = sigmoid(6 * (q(y) - q(y')) + 3 * cycle(style(y), style(y'))),
               the cycle dominating: q = min(rubric, 4) for a well-formed answer, 0 for a broken
               one, so every answer scoring 4+ (the teacher's and the student's) is equally correct
               and the style cycle alone decides between them, 0.95 to 0.05; a missing point below 4
               outweighs the cycle (1 point short, winning style: 0.05). Its Nash policy answers
               correctly in the three styles uniformly (worst-case win-rate 1/2); a policy in one
               style loses 0.95 of the time to the style that beats it.

Departures from the paper (numbered):
  1. The task, the teacher and the judges are programs, not UltraFeedback / GPT-4-Turbo.
  2. The teacher's style mix (--teacher_styles, default 0.55 / 0.30 / 0.15) is a setting of ours; an
     uneven mix gives a fitted BT reward a favourite, a lopsided one (0.8 / 0.15 / 0.05) leaves pi_1
     exploitable. The Bradley-Terry baseline lives in compare_bt.py.
  3. demo_rps is ours: a preference where the cycle dominates, so the paper's claim (DNO targets the
     Nash equilibrium of a general preference; a BT reward's optimum is exploitable) can be tested
     on a language model.
"""
import math
import random
import re
import sys
from dataclasses import dataclass

from dnolib.cli import cli

STYLES = (" ", ",", "|")  # the three response styles; cycle: STYLES[i] beats STYLES[i + 1 (mod 3)]
# the teacher's default style mix (uneven: a BT fit has a favourite)
TEACHER_STYLE_P = (0.55, 0.30, 0.15)
P_TAIL = 0.85   # teacher: P(botches the tail | >= LONG digits, the largest one unique)
# ... of which this share is a rotation (score 4), the rest an adjacent swap (score 5)
P_ROTATE = 0.4
LONG = 4
MIN_LEN, MAX_LEN = 3, 7
# demo_rps: rubric points above this do not count (the teacher's 4..6 answers are equally correct)
RPS_CAP = 4
# demo_rps: the cycle's weight; of two equally correct answers, the winning style wins with
# probability sigmoid(3) = 0.95
RPS_CYCLE = 3.0
# demo_rps: the weight of a rubric point below the cap (twice the cycle: correctness comes first)
RPS_POINT = 6.0
PROMPT_RE = re.compile(r"sort: ([0-9](?: [0-9])*)\n?$")


# ----------------------------------------------------------------------------- the task

def make_prompt(rng, lengths=(MIN_LEN, MAX_LEN)):
    """One prompt 'sort: d d d\\n' with lengths[0]..lengths[1] random digits."""
    n = rng.randint(*lengths)
    return "sort: " + " ".join(str(rng.randint(0, 9)) for _ in range(n)) + "\n"


def parse_prompt(prompt):
    m = PROMPT_RE.match(prompt.strip(" ") if isinstance(prompt, str) else "")
    if m is None:
        raise ValueError(f"not a demo prompt (expected 'sort: d d d'): {prompt!r}")
    return [int(c) for c in m.group(1).split(" ")]


def parse_lengths(text):
    """'3,4' -> (3, 4): the fewest and most digits of a prompt (2..9; one digit has no style)."""
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        lo = hi = 0
    if not 2 <= lo <= hi <= 9:
        raise ValueError(f"--lengths must be two digit counts 2 <= min <= max <= 9, like 3,7; "
                         f"got {text!r}")
    return lo, hi


def parse_styles(text):
    """'0.8,0.15,0.05' -> (0.8, 0.15, 0.05): the teacher's probabilities of the styles ' ', ',',
    '|'."""
    try:
        p = tuple(float(x) for x in text.split(","))
    except ValueError:
        p = ()
    if len(p) != 3 or not all(math.isfinite(x) and x >= 0 for x in p) or abs(sum(p) - 1) > 1e-6:
        raise ValueError(f"--teacher_styles must be 3 probabilities summing to 1, like 0.8,0.15,0.05; "
                         f"got {text!r}")
    return p


def teacher(prompt, rng, styles=TEACHER_STYLE_P):
    """The imperfect teacher: the sorted digits in a style drawn from `styles`, except that on lists
    of >= LONG digits it botches the tail with probability P_TAIL (one decision late in the answer,
    which a student imitates):
      - "tail swap"     (share 1 - P_ROTATE): the last two digits swapped          -> 1 inversion,
        score 5
      - "tail rotation" (share P_ROTATE): the largest digit moved two places left -> 2 inversions,
        score 4"""
    digits = sorted(parse_prompt(prompt))
    style = rng.choices(STYLES, weights=styles)[0]
    if len(digits) >= LONG and digits[-2] < digits[-1] and rng.random() < P_TAIL:
        if rng.random() < P_ROTATE:
            digits[-3:] = [digits[-1], digits[-3], digits[-2]]
        else:
            digits[-2:] = [digits[-1], digits[-2]]
    return style.join(str(d) for d in digits)


def teacher_error_rate(prompt):
    """P(the teacher's answer to prompt is not perfect), by design."""
    digits = sorted(parse_prompt(prompt))
    return P_TAIL if len(digits) >= LONG and digits[-2] < digits[-1] else 0.0


def parse_response(text):
    """(digits, style) of a well-formed response, or (digits found, None) if the format is
    broken."""
    text = text.strip()
    digits = [int(c) for c in text if c.isdigit()]
    for s in STYLES:
        if re.fullmatch(r"[0-9](?:%s[0-9])*" % re.escape(s), text):
            return digits, s
    return digits, None


def inversions(xs):
    return sum(1 for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[i] > xs[j])


def rubric(prompt, response):
    """The additive 0..6 score of one response (see the module docstring)."""
    want = parse_prompt(prompt)
    got, style = parse_response(response)
    score = int(style is not None)
    if len(got) == len(want):
        score += 1 + max(0, 3 - inversions(got))
    score += int(sorted(got) == sorted(want))
    return score


def style_of(response):
    return parse_response(response)[1]


def cycle(a, b):
    """+1 if style a beats style b in the cycle " " > "," > "|" > " ", -1 if it loses, 0
    otherwise."""
    if a is None or b is None or a == b:
        return 0
    return 1 if (STYLES.index(a) + 1) % 3 == STYLES.index(b) else -1


def pref(prompt, a, b, score_a=None, score_b=None):
    """P(a > b | prompt) of the intransitive judge; pref(a, b) + pref(b, a) == 1."""
    sa = rubric(prompt, a) if score_a is None else score_a
    sb = rubric(prompt, b) if score_b is None else score_b
    z = 2.0 * (sa - sb) + 1.5 * cycle(style_of(a), style_of(b))
    return 1.0 / (1.0 + math.exp(-z))


def quality_rps(prompt, response, score=None):
    """demo_rps's correctness: the rubric capped at RPS_CAP, so every well-formed answer scoring 4+
    (the teacher's, botched tails included) is equally correct; a broken format is worth 0 (no
    neutral, style-less escape)."""
    score = rubric(prompt, response) if score is None else score
    return min(score, RPS_CAP) if style_of(response) is not None else 0


def pref_rps(prompt, a, b, score_a=None, score_b=None):
    """P(a > b | prompt) of the rock-paper-scissors judge: the style cycle decides among equally
    correct answers."""
    z = RPS_POINT * (quality_rps(prompt, a, score_a) - quality_rps(prompt, b, score_b))
    z += RPS_CYCLE * cycle(style_of(a), style_of(b))
    return 1.0 / (1.0 + math.exp(-z))


def pref_table(pref_fn, prompt, candidates):
    """The n x n table P[i][j] = P(candidate i > candidate j) of a pairwise judge (diagonal 1/2)."""
    s = [rubric(prompt, c) for c in candidates]
    n = len(candidates)
    return [[0.5 if i == j else pref_fn(prompt, candidates[i], candidates[j], s[i], s[j]) for j in range(n)]
            for i in range(n)]


def demo(prompt, candidates):
    """The default judge: listwise rubric scores 0..6 (like the paper's batched GPT-4 call)."""
    return {"scores": [float(rubric(prompt, c)) for c in candidates]}


def demo_cyclic(prompt, candidates):
    """The intransitive judge: an n x n table P[i][j] = P(candidate i > candidate j)."""
    return {"P": pref_table(pref, prompt, candidates)}


def demo_rps(prompt, candidates):
    """The rock-paper-scissors judge: the same table under pref_rps, where the style cycle
    dominates."""
    return {"P": pref_table(pref_rps, prompt, candidates)}


# demo_bt (experiments/compare_bt.py) is the BT one
JUDGES = {"demo": demo, "demo_cyclic": demo_cyclic, "demo_rps": demo_rps}
# the pairwise judges, P(a > b | x) of two answers
PREFS = {"demo_cyclic": pref, "demo_rps": pref_rps}


def prompt_rows(n, seed, salt, exclude=(), styles=TEACHER_STYLE_P,
                lengths=(MIN_LEN, MAX_LEN)):
    """n rows {"id", "prompt", "gold"} with distinct prompts not in exclude; gold = the teacher's
    response (its style drawn from `styles`)."""
    rng, seen, rows = random.Random(f"{salt}-{seed}"), set(exclude), []
    distinct = sum(10 ** k for k in range(lengths[0], lengths[1] + 1))
    if n + len(seen) > distinct:       # a bound: the loop below would never end
        raise ValueError(f"{n} new prompts beside {len(seen)} others, but lists of "
                         f"{lengths[0]}..{lengths[1]} digits make only {distinct} prompts")
    while len(rows) < n:
        p = make_prompt(rng, lengths)
        if p not in seen:
            seen.add(p)
            rows.append({"id": f"{salt}-{len(rows)}", "prompt": p, "gold": teacher(p, rng, styles)})
    return rows


# ----------------------------------------------------------------------------- command line

@dataclass
class Config:
    seed: int = 0                 # seeds the prompts and the teacher
    teacher_styles: str = ""      # teacher style mix, e.g. 0.8,0.15,0.05 (empty: TEACHER_STYLE_P)


def show(n=6, seed=0, styles=TEACHER_STYLE_P):
    """A few prompts, the teacher's answers and both judges' view of them."""
    rng = random.Random(seed)
    for _ in range(n):
        p = make_prompt(rng)
        y = teacher(p, rng, styles)
        print(f"{p.strip():24s} -> teacher {y!r:18s} score {rubric(p, y)}/6   "
              f"(P(teacher err) = {teacher_error_rate(p):.2f})")
    p = "sort: 4 1 3 0\n"
    cands = ["0 1 3 4", "0,1,3,4", "0|1|3|4", "0 1 4 3", "1 3 4", "0 1 3 4 4 4"]
    print(f"\n{p.strip()}: candidates {cands}\n  demo scores  {demo(p, cands)['scores']}")
    for name in PREFS:
        print(f"  {name} P among the 3 correct styles (row beats column):")
        for c, row in zip(cands[:3], JUDGES[name](p, cands[:3])["P"]):
            print(f"    {c!r:10s} " + " ".join(f"{x:.2f}" for x in row))


if __name__ == "__main__":
    cfg = cli(Config)
    try:
        styles = parse_styles(cfg.teacher_styles) if cfg.teacher_styles else TEACHER_STYLE_P
        show(seed=cfg.seed, styles=styles)
    except ValueError as e:
        sys.exit(f"error: {e}")
