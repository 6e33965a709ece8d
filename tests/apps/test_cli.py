import json

from ftn.apps.cli import main


def test_params_resnet34_json(capsys):
    assert main(["params", "--backbone", "resnet34", "--rank", "40", "--tasks", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["per_task_delta"] == 656_280
    assert report["backbone"] == 21_284_672
    assert report["paper_total"] == 25_222_352


def test_params_text_reports_caps(capsys):
    assert main(["params", "--backbone", "mobilenet_v2", "--rank", "40"]) == 0
    out = capsys.readouterr().out
    assert "paper convention" in out and "rank cap [task1] features.1.conv.0.0" in out


def test_unknown_backbone_is_a_clear_error(capsys):
    assert main(["params", "--backbone", "resnet35"]) == 2
    assert "unknown backbone 'resnet35'" in capsys.readouterr().err
