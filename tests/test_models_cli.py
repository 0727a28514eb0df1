import json

from dermbatch.cli.main import main


def test_info_json_summarises_the_bundle(tiny_bundle, capsys):
    assert main(["info", "--model", str(tiny_bundle.path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["name"] == "tiny-test"
    assert summary["segmentation"]["folds"] == [0, 1]
    assert summary["classification"]["model"] == "timm / mobilenetv3_small_050"
    assert summary["engines"] == []


def test_info_text_carries_the_intended_use_warning(tiny_bundle, capsys):
    assert main(["info", "--model", str(tiny_bundle.path)]) == 0
    assert "not a medical device" in capsys.readouterr().out


def test_models_lists_bundles_in_a_folder(tiny_bundle, capsys):
    assert main(["models", str(tiny_bundle.path.parent)]) == 0
    assert "tiny-test" in capsys.readouterr().out
