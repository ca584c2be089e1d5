"""Fig. 3 of the paper (the annotation prompt) held clause by clause in oracle.RUBRIC_TEMPLATE.

The paper's judge governs the length growth it reports, and it penalises length at points 3, 4, 5
and 6: each of those clauses is pinned here, in the point it belongs to, so an edit cannot drop
or soften one silently (test_each_length_clause_is_caught shows the check failing without it).
"""
import os
import re

import oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# point -> the length clauses Fig. 3 puts there (our wording of each)
LENGTH = {3: ["without rambling"],
          4: ["extraneous content or excess wordiness"],
          5: ["focused and succinct"],
          6: ["*AND* concise", "no unnecessary information and no wordiness at all"]}
# point -> the rest of what Fig. 3 requires there
OTHER = {1: ["form of an answer", "say the same thing over and over", "carry on the question",
             "question/answer pairs or examples"],
         2: ["on topic", "some information", "even when it is partial or includes some off-topic"],
         3: ["substantial part", "does not settle the question fully or give a direct answer"],
         4: ["nearly every element", "correctly", "usefully and directly", "hardly any errors"],
         5: ["entirely correct", "made-up facts", "directly answers every aspect", "helpful",
             "well-organised"],
         6: ["entirely correct", "impeccably tailored", "expert knowledge",
             "superbly high-quality, focused and insightful"]}
FRAME = ["additive 6-point scale", "one point for each criterion it meets", "sum of the points"]
INSTRUCTIONS = ["EACH response, justify its total briefly, in at most 100 words", "Score EACH",
                '"Score: <points>"', "AI Assistant's perspective", "web-search knowledge",
                "score EACH candidate on its own", "dictionary and nothing else",
                '"id<k>_justification"', '"id<k>_score"']
# drifted wording that once replaced the paper's (Self-Rewarding LM's prompt, or ours)
FORBIDDEN = ["stop at the first", "even if it could be", "engaging", "basic elements",
             "slightly clearer"]


def words(text):
    return " ".join(text.split())


def points(template):
    """{1..6: the words of point k} from the scale above the '### User:' part."""
    scale = template.split("### User:")[0]
    parts = re.split(r"^(\d)\. ", scale, flags=re.M)
    return {int(k): words(v) for k, v in zip(parts[1::2], parts[2::2])}


def missing(template):
    """Every Fig. 3 requirement the template lacks, as (where, clause); [] when all are there."""
    pts, whole = points(template), words(template)
    out = [(f"point {k}", c) for table in (LENGTH, OTHER) for k, cs in table.items()
           for c in cs if c not in pts.get(k, "")]
    out += [("frame", c) for c in FRAME if c not in words(template.split("1. ")[0])]
    out += [("instructions", c) for c in INSTRUCTIONS
            if c not in words(template.split("### Instructions:")[-1])]
    out += [("forbidden", c) for c in FORBIDDEN if c.lower() in whole.lower()]
    heads = [whole.find(h) for h in ("### User:", "### Candidate Responses:", "### Instructions:")]
    if -1 in heads or heads != sorted(heads) or sorted(pts) != [1, 2, 3, 4, 5, 6]:
        out.append(("layout", "six points, then the three headed parts in Fig. 3's order"))
    return out


def test_template_holds_every_clause_of_figure_3():
    assert missing(oracle.RUBRIC_TEMPLATE) == []
    text = oracle.rubric_prompt("sort: 3 1 2", ["1 2 3", "3 2 1"])
    assert text.index("sort: 3 1 2") < text.index("[Candidate 1]") < text.index("### Instructions:")
    assert '"id2_score"' in text and text.endswith(oracle.PREFILL)   # the readers' format, kept
    assert oracle.TEMPLATE_VERSION == "dno-judges-v5"   # bumped once: old cached answers unserved


def test_each_length_clause_is_caught():
    """Drop any one length clause of points 3-6 (or soften point 5 as it once was): caught."""
    for k, clauses in LENGTH.items():
        for c in clauses:
            flat = words(oracle.RUBRIC_TEMPLATE)
            assert c in flat
            assert (f"point {k}", c) in missing(flat.replace(c, "")), (k, c)
    softened = words(oracle.RUBRIC_TEMPLATE).replace(
        "focused and succinct.", "focused, even if it could be slightly clearer.")
    assert ("point 5", "focused and succinct") in missing(softened)
    assert ("forbidden", "even if it could be") in missing(softened)
    moved = words(oracle.RUBRIC_TEMPLATE).replace("without rambling, ", "").replace(
        "excess wordiness.", "excess wordiness, without rambling.")
    assert ("point 3", "without rambling") in missing(moved)   # in its own point, not elsewhere


def test_no_system_message_and_no_stop_rule(tmp_path):
    item = {"id": "a", "prompt": "p", "candidates": ["x", "y"]}
    cfg = oracle.Config(judge="rubric", cache="")
    units, _, _ = oracle.plan_item(item, cfg, None, None, "h|m")
    assert [m["role"] for m in units[0]["messages"]] == ["user"]
    assert not hasattr(oracle, "SYSTEM")


def test_docs_map_every_clause():
    doc = words(open(os.path.join(ROOT, "docs", "paper.md")).read())
    assert "the rubric's only length penalty" not in doc
    for k in range(1, 7):
        assert f"| {k} |" in doc   # the clause table: point k -> our wording -> faithful / departure
    for clause in ("without rambling", "excess wordiness", "focused and succinct", "concise"):
        assert clause in doc
