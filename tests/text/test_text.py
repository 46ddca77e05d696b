"""Text modality: byte tokenizer, text source reader, the transformer encoder and masked_tokens."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fedssl.data.text import CLS, MASK, PAD, SPECIALS, VOCAB_SIZE, decode, encode, is_text_source, read_texts
from fedssl.inputs import TEXT, encoder_input_problem, pretext_input_problem
from fedssl.models import build_encoder
from fedssl.pretext import get_pretext
from fedssl.pretext.masked_tokens import masked_token_loss, token_mask
from fedssl.sample_format import SampleFormat


def test_tokenizer_round_trip_and_length_rule():
    ids = encode("héllo", 10)
    assert ids[0] == CLS and len(ids) == 10 and ids[-1] == PAD
    assert decode(ids) == "héllo"
    assert max(ids) < VOCAB_SIZE
    cut = encode("abcdef", 4)  # CLS + 3 bytes, truncated
    assert cut == [CLS, ord("a") + SPECIALS, ord("b") + SPECIALS, ord("c") + SPECIALS]
    with pytest.raises(ValueError, match="max_length"):
        encode("x", 1)


def test_text_sources(tmp_path):
    lines = tmp_path / "s.txt"
    lines.write_text("first\n\nsecond line\n", encoding="utf-8")
    assert is_text_source(lines) and read_texts(lines) == ["first", "second line"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "b.txt").write_text("doc b\nmore", encoding="utf-8")
    (docs / "a.txt").write_text("doc a", encoding="utf-8")
    assert is_text_source(docs) and read_texts(docs) == ["doc a", "doc b\nmore"]
    (docs / "x.png").write_bytes(b"\x89PNG")
    assert not is_text_source(docs)  # a folder with images stays an image folder


def test_bad_text_sources_say_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no text samples") as err:
        read_texts(empty)
    assert "\n" not in str(err.value)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\n\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8") as err:
        read_texts(binary)
    assert "\n" not in str(err.value)


def test_mask_hides_only_bytes_and_at_least_one_per_sample():
    torch.manual_seed(0)
    ids = torch.tensor([encode("ab", 8), encode("a longer sentence", 8)])
    for _ in range(20):
        mask = token_mask(ids, 0.15)
        assert not mask[ids < SPECIALS].any()
        assert (mask.sum(1) >= 1).all()


def test_masked_token_loss_matches_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, VOCAB_SIZE)
    targets = torch.randint(SPECIALS, VOCAB_SIZE, (2, 5))
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    want = []
    for b in range(2):
        positions = mask[b].nonzero().flatten()
        want.append(torch.stack([F.cross_entropy(logits[b, t][None], targets[b, t][None]) for t in positions]).mean())
    assert torch.allclose(masked_token_loss(logits, targets, mask), torch.stack(want))


def test_masked_tokens_model_gives_one_loss_per_sample_and_pooled_features():
    encoder = build_encoder("transformer", (16,), width=16, depth=1, seed=0)
    x = torch.tensor([encode(t, 16) for t in ["one", "two words", "three"]])
    model = get_pretext("masked_tokens").build_model(encoder)
    losses = model(x)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert encoder(x).shape == (3, 16)
    assert MASK not in x  # the input is not changed in place


def test_transformer_passes_opacus_validator_and_grad_sampler():
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    encoder = build_encoder("transformer", (8,), width=16, depth=1, seed=0)
    model = get_pretext("masked_tokens").build_model(encoder)
    assert ModuleValidator.validate(model, strict=False) == []
    gsm = GradSampleModule(model)
    x = torch.tensor([encode(t, 8) for t in ["abc", "defgh"]])
    gsm(x).sum().backward()
    assert all(p.grad_sample.shape[0] == 2 for p in model.parameters() if p.requires_grad)


def test_input_rules_name_the_fix():
    assert "model.encoder=transformer" in encoder_input_problem("cnn", (32,), TEXT)
    assert encoder_input_problem("transformer", (32,), TEXT) is None
    assert "reads text" in encoder_input_problem("transformer", (1, 8, 8))
    key, problem = pretext_input_problem("rotation", {}, (32,), TEXT)
    assert key == "pretext.name" and "masked_tokens" in problem
    assert pretext_input_problem("masked_tokens", {}, (32,), TEXT) is None
    assert pretext_input_problem("masked_tokens", {}, (1, 8, 8))[0] == "pretext.name"


def test_loader_reads_text_sources_as_byte_ids_and_bad_ones_in_one_line(tmp_path):
    from fedssl.data.loaders import load_site_data
    from fedssl.errors import DataError

    lines = tmp_path / "s.txt"
    lines.write_text("hello\nworld wide\n", encoding="utf-8")
    data = load_site_data(lines, options=SampleFormat(max_length=6))
    assert data.modality == TEXT and data.input_shape == (6,) and data.sample_ids == ("row-0", "row-1")
    assert decode([int(v) for v in data.inputs[1]]) == "world"  # CLS + 5 bytes: truncated
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text samples"):
        load_site_data(tmp_path / "empty.txt")


def test_fortunes_converter_writes_lines_and_row_id_labels(tmp_path):
    import importlib.util
    from pathlib import Path

    from fedssl.data.loaders import load_site_data

    path = Path(__file__).resolve().parents[2] / "simulations" / "fortunes_to_text.py"
    spec = importlib.util.spec_from_file_location("fortunes_to_text", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "food").write_text("Eat\n  more.\n%\nPie.\n%\n")
    (tmp_path / "src" / "love").write_text("Love is\nall.\n%\n")
    assert module.convert(tmp_path / "src", tmp_path / "out", ("food", "love")) == 3
    assert load_site_data(tmp_path / "out" / "fortunes.txt").sample_ids == ("row-0", "row-1", "row-2")
    assert (tmp_path / "out" / "labels.csv").read_text().split() == ["id,label", "row-0,food", "row-1,food", "row-2,love"]


# ---------------------------------------------------------------------------------------------
# Padding is invisible: attention never looks at PAD keys, so only the text matters, not data.max_length

SHORT_TEXTS = ["hi", "card lost", "a", "how much is the fee", "twenty-two bytes long!"]  # < 23 bytes: never truncated


def _twin_encoders(short: int, long: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two encoders with the same weights, for max_length ``short`` and ``long`` (same first positions)."""
    long_encoder = build_encoder("transformer", (long,), width=32, depth=2, seed=0)
    short_encoder = build_encoder("transformer", (short,), width=32, depth=2, seed=0)
    state = long_encoder.state_dict()
    state["position_embedding.weight"] = state["position_embedding.weight"][:short]
    short_encoder.load_state_dict(state)
    return short_encoder.eval(), long_encoder.eval()


def test_features_do_not_depend_on_the_amount_of_padding():
    short_encoder, long_encoder = _twin_encoders(24, 40)
    short_ids = torch.tensor([encode(t, 24) for t in SHORT_TEXTS])
    long_ids = torch.tensor([encode(t, 40) for t in SHORT_TEXTS])
    assert torch.equal(long_ids[:, :24], short_ids) and (long_ids[:, 24:] == PAD).all()  # only the padding differs
    with torch.no_grad():
        assert torch.allclose(short_encoder(short_ids), long_encoder(long_ids), atol=1e-5)
        real = short_ids != PAD
        short_tokens, long_tokens = short_encoder.tokens(short_ids), long_encoder.tokens(long_ids)[:, :24]
        assert torch.allclose(short_tokens[real], long_tokens[real], atol=1e-5)


def test_features_do_not_depend_on_the_pad_embedding():
    encoder = build_encoder("transformer", (16,), width=32, depth=2, seed=0).eval()
    x = torch.tensor([encode(t, 16) for t in ["one", "two words", "a"]])
    with torch.no_grad():
        before, tokens_before = encoder(x), encoder.tokens(x)
        encoder.token_embedding.weight[PAD].add_(torch.randn(32))
        real = x != PAD
        assert torch.allclose(encoder(x), before, atol=1e-6)
        assert torch.allclose(encoder.tokens(x)[real], tokens_before[real], atol=1e-6)


def test_a_sample_of_nothing_but_pads_stays_finite():
    encoder = build_encoder("transformer", (8,), width=16, depth=1, seed=0)
    x = torch.tensor([[PAD] * 8, encode("abc", 8)])
    assert torch.isfinite(encoder.tokens(x)).all() and torch.isfinite(encoder(x)).all()


def test_masked_tokens_are_attended_and_only_pads_are_hidden():
    """MASK replaces bytes, never pads; a MASK token is a key like any byte (only PAD is hidden),
    and the loss over the masked positions does not depend on the amount of padding."""
    from fedssl.models.text import padding_mask

    torch.manual_seed(0)
    ids = torch.tensor([encode(t, 24) for t in SHORT_TEXTS])
    mask = token_mask(ids, 0.3)
    corrupted = ids.masked_fill(mask, MASK)
    assert torch.equal(padding_mask(corrupted), ids == PAD)  # masked bytes are not padding
    short_encoder, long_encoder = _twin_encoders(24, 40)
    with torch.no_grad():
        cls_before = short_encoder.tokens(corrupted)[:, 0]  # CLS is never masked; it sees every non-pad key
        shift = torch.randn(32, generator=torch.Generator().manual_seed(1))  # not constant: LayerNorm would remove that
        short_encoder.token_embedding.weight[MASK].add_(shift)
        assert not torch.allclose(short_encoder.tokens(corrupted)[:, 0], cls_before, atol=1e-3)
        short_encoder.token_embedding.weight[MASK].sub_(shift)
    head = torch.nn.Linear(32, VOCAB_SIZE)
    long_corrupted = F.pad(corrupted, (0, 16), value=PAD)
    long_mask, long_ids = F.pad(mask, (0, 16), value=False), F.pad(ids, (0, 16), value=PAD)
    with torch.no_grad():
        short_loss = masked_token_loss(head(short_encoder.tokens(corrupted)), ids, mask)
        long_loss = masked_token_loss(head(long_encoder.tokens(long_corrupted)), long_ids, long_mask)
    assert torch.allclose(short_loss, long_loss, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_opacus_per_sample_gradients_of_padded_texts_equal_autograd():
    from opacus import GradSampleModule

    x = torch.tensor([encode(t, 16) for t in ["a", "hello world", "sixteen bytes!!!", "zz"]])
    model = build_encoder("transformer", (16,), width=16, depth=1, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    want = [torch.autograd.grad(torch.tanh(model(x[i : i + 1])).pow(2).sum(), params) for i in range(len(x))]
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.tanh(gsm(x)).pow(2).sum().backward()
    for j, p in enumerate(params):
        for i in range(len(x)):
            assert torch.allclose(p.grad_sample[i], want[i][j], atol=1e-6, rtol=1e-4)
    gsm._close()
