import torch

from gesso.engine.data.captions import augment, read_caption, with_trigger

TAGS = ["zzk", "1girl", "red hair", "smile", "outdoors", "sky", "tree", "hat"]


def test_shuffle_keeps_the_first_keep_tokens_tags_in_place():
    g = torch.Generator().manual_seed(0)
    caption = ", ".join(TAGS)
    draws = [augment(caption, True, 2, 0.0, g).split(", ") for _ in range(50)]
    for tags in draws:
        assert tags[:2] == TAGS[:2] and sorted(tags[2:]) == sorted(TAGS[2:])
    assert len({tuple(t) for t in draws}) > 25  # 6! = 720 orders: the rest really moves


def test_dropout_empties_the_whole_caption_at_its_rate():
    g = torch.Generator().manual_seed(0)
    caption = ", ".join(TAGS)
    dropped = sum(augment(caption, False, 0, 0.25, g) == "" for _ in range(2000))
    assert 400 < dropped < 600
    state = g.get_state()
    assert all(augment(caption, False, 0, 0.0, g) == caption for _ in range(10))
    assert torch.equal(g.get_state(), state)  # options off draw nothing: other randomness stays where it was


def test_trigger_is_prepended_only_when_missing_as_a_word():
    assert with_trigger("1girl, zzk, smile", "zzk") == "1girl, zzk, smile"
    assert with_trigger("zzkx style", "zzk") == "zzk, zzkx style"
    assert with_trigger("", "zzk") == "zzk"
    assert with_trigger("smile", "") == "smile"


def test_caption_files_first_line_bom_and_second_extension(tmp_path):
    image = tmp_path / "a.png"
    (tmp_path / "a.caption").write_bytes(b"\xef\xbb\xbf\n  first line  \nsecond line\n")
    assert read_caption(image, ".txt") == ("first line", tmp_path / "a.caption", None)
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("cp1252"))
    caption, path, problem = read_caption(image, ".txt")
    assert caption == "caf\ufffd" and path == tmp_path / "a.txt" and "not UTF-8" in problem
    assert read_caption(tmp_path / "b.png") == ("", None, "no caption file")
