"""Labels and roles of rendered OneGen conversations, checked by hand (onegen_core.text.conversation)."""

from __future__ import annotations

import pytest

from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.roles import Role
from onegen_core.formats.spec import PRESETS
from onegen_core.text.conversation import render_conversation
from onegen_core.text.rendering import Renderer, RenderError

C, G, R = Role.CTX, Role.GEN, Role.RET


@pytest.fixture(scope="module")
def renderer(tiny_checkpoint):
    return Renderer.for_checkpoint(load_checkpoint(tiny_checkpoint))


def spans(renderer, conv):
    """Consecutive tokens with the same (role, target) merged into (text, role, target)."""
    out: list[tuple[str, Role, bool]] = []
    run: list[int] = []
    key = None
    for t, r, g in zip(conv.ids, conv.roles, conv.targets, strict=True):
        if (r, g) != key and run:
            out.append((renderer.tokenizer.decode(run), *key))
            run = []
        key = (r, g)
        run.append(t)
    out.append((renderer.tokenizer.decode(run), *key))
    return out


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is Paris?"},
    {"role": "assistant", "content": "It is[RQ]<paragraph>Paris is in France.</paragraph> in France.",
     "positive": [["paris"]], "negative": [[]]},
    {"role": "user", "content": "And Rome?"},
    {"role": "assistant", "content": "[RQ]<paragraph>Rome is in Italy.</paragraph>Italy."},
]


def test_chat_template_labels_and_roles(renderer):
    conv = render_conversation(renderer, MESSAGES)
    assert spans(renderer, conv) == [
        ("<|system|>\nBe brief.</s>\n<|user|>\nWhere is Paris?</s>\n<|assistant|>\n", C, False),  # system+user CTX
        ("It is", G, True),  # assistant text: GEN
        ("[RQ]", R, True),  # the query token is RET and itself an LM target
        ("<paragraph>Paris is in France.</paragraph>", C, False),  # the passage span, delimiters included: CTX
        (" in France.</s>", G, True),  # the rest of the turn and its end-of-turn token: GEN
        ("\n<|user|>\nAnd Rome?</s>\n<|assistant|>\n", C, False),
        ("[RQ]", R, True),
        ("<paragraph>Rome is in Italy.</paragraph>", C, False),
        ("Italy.</s>", G, True),
        ("\n", C, False),
    ]
    rq = renderer.token_ids.by_name["[RQ]"]
    assert [conv.ids[p] for p in conv.query_positions] == [rq, rq]
    assert conv.query_messages == [2, 4]
    # the text before the first answer is exactly the engine's prompt for this conversation
    prompt = renderer.chat(MESSAGES[:2], add_generation_prompt=True).ids
    assert conv.ids[: len(prompt)] == prompt
    labels = conv.labels()
    assert len(labels) == len(conv.ids)
    assert all((lab == -100) != g for lab, g in zip(labels, conv.targets, strict=True))


def test_label_after_a_query_token_is_ignored(renderer):
    """What follows a query token is inserted or forced by the engine, never sampled: no LM target there."""
    msgs = [{"role": "user", "content": "Tell me about Paris."},
            {"role": "assistant", "content": "Paris[RQ] is the capital."}]
    conv = render_conversation(renderer, msgs)
    (p,) = conv.query_positions
    assert conv.roles[p] == R and conv.targets[p]
    assert renderer.tokenizer.decode([conv.ids[p + 1]]) == " is"
    assert conv.roles[p + 1] == G and not conv.targets[p + 1]
    assert conv.targets[p + 2]


def test_concat_format_is_onegens_document_templator(renderer):
    msgs = [{"role": "user", "content": "Q: where is Paris? A:"},
            {"role": "assistant", "content": "[RQ]<paragraph>Paris is in France.</paragraph> France"}]
    conv = render_conversation(renderer, msgs, format="concat")
    assert spans(renderer, conv) == [
        ("Q: where is Paris? A:", C, False),
        ("[RQ]", R, True),
        ("<paragraph>Paris is in France.</paragraph>", C, False),
        (" France", G, True),
    ]
    assert conv.ids[: len(renderer.prompt("Q: where is Paris? A:"))] == renderer.prompt("Q: where is Paris? A:").ids


def test_entity_linking_tokens(tiny_checkpoint_factory):
    ck = load_checkpoint(tiny_checkpoint_factory("llama", spec=PRESETS["entity-linking"]))
    r = Renderer.for_checkpoint(ck)
    msgs = [{"role": "user", "content": "Paris is in France."},
            {"role": "assistant", "content": "Paris[LK][_CONTINUE_] is in France[LK][_CONTINUE_]."}]
    conv = render_conversation(r, msgs)
    lk, cont = ck.token_ids.by_name["[LK]"], ck.token_ids.by_name["[_CONTINUE_]"]
    assert [conv.ids[p] for p in conv.query_positions] == [lk, lk]
    for p in conv.query_positions:  # [_CONTINUE_] is forced by the engine after [LK]: not a target
        assert conv.ids[p + 1] == cont and not conv.targets[p + 1] and conv.roles[p + 1] == G


@pytest.mark.parametrize("content, message", [
    ("[RQ]<paragraph>open", "never closed"),
    ("x</paragraph>", "without a preceding"),
    ("<paragraph><paragraph>x</paragraph>", "opened twice"),
])
def test_bad_passage_spans(renderer, content, message):
    with pytest.raises(RenderError, match=message):
        render_conversation(renderer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}])


def test_bad_messages(renderer):
    with pytest.raises(RenderError, match="role"):
        render_conversation(renderer, [{"role": "bot", "content": "x"}])
    with pytest.raises(RenderError, match="start with system or user"):
        render_conversation(renderer, [{"role": "assistant", "content": "x"}])
    with pytest.raises(RenderError, match="content"):
        render_conversation(renderer, [{"role": "user"}])


def test_an_answer_marked_not_learned_keeps_only_its_query_token(renderer):
    """``"learn_answer": false``: the query token is still learned (RET, target, contrastive), the answer after
    the passage and the end of turn are context; the same message without the flag learns them."""
    reply = {"role": "assistant", "content": "[RQ]<paragraph>Paris is in France.</paragraph> In France.",
             "positive": [["paris"]], "negative": [[]]}
    msgs = [{"role": "user", "content": "Where is Paris?"}, {**reply, "learn_answer": False}]
    conv = render_conversation(renderer, msgs)
    assert spans(renderer, conv)[1:] == [
        ("[RQ]", R, True),
        ("<paragraph>Paris is in France.</paragraph> In France.</s>\n", C, False),
    ]
    assert len(conv.query_positions) == 1
    learned = render_conversation(renderer, [msgs[0], reply])
    assert learned.ids == conv.ids
    assert sum(learned.targets) > sum(conv.targets) == 1


def test_learn_answer_must_be_a_boolean_on_an_assistant_message(renderer):
    with pytest.raises(RenderError, match="learn_answer"):
        render_conversation(renderer, [{"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "a", "learn_answer": "no"}])
    with pytest.raises(RenderError, match="learn_answer"):
        render_conversation(renderer, [{"role": "user", "content": "q", "learn_answer": False},
                                       {"role": "assistant", "content": "a"}])
