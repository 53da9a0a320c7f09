"""One source per default: the API's set_generation_params, the command lines, the server's
request schema and the load test take their decoding defaults from the engine's option dataclasses (DecodingParams, ARParams,
HybridOptions, RescoreOptions, UnmaskOptions) and the service's limits from theirs. A literal
restated in one of them, and later changed in one place only, fails here."""
import dataclasses
import importlib.util
import inspect
import json
import types
from pathlib import Path

import pytest

from magnet_engine import cli, speech_cli
from magnet_engine.engine import hybrid, rescoring
from magnet_engine.engine.config import SPAN_ARRANGEMENTS, SPAN_SCORINGS, DecodingParams
from magnet_engine.engine.generate import ENGINES
from magnet_engine.engine.playdiffusion.unmasking import UnmaskOptions
from magnet_engine.playdiffusion import BaseInput, PlayDiffusion


def dataclass_generation_params() -> dict:
    """MAGNeT.set_generation_params' keywords as the dataclasses default them."""
    hyb, ar, res = hybrid.HybridOptions(), hybrid.ARParams(), rescoring.RescoreOptions()
    return {**dataclasses.asdict(DecodingParams()), "duration": None,
            "hybrid_prefix_seconds": hyb.prefix_seconds, "hybrid_handoff": hyb.handoff,
            "hybrid_prefix_attention": hyb.prefix_attention, "prefix_model": None,
            "ar_top_k": ar.top_k, "ar_top_p": ar.top_p, "ar_temperature": ar.temperature,
            "ar_cfg_coef": None,   # None: the checkpoint's inference_coef, not ARParams' placeholder
            "rescorer": None, "rescore_weight": res.weight, "rescore_temperature": res.temperature,
            "rescore_fill": res.fill, "rescore_cfg_coef": res.cfg_coef}


def test_set_generation_params_defaults_are_the_dataclasses(tiny_dir):
    """The signature shows the dataclasses' defaults (audiocraft's names and order), and a call
    with none given sets exactly the dataclasses' options."""
    from magnet_engine.api import MAGNeT

    signature = inspect.signature(MAGNeT.set_generation_params).parameters
    defaults = {name: p.default for name, p in signature.items() if name != "self"}
    assert defaults == {**dataclass_generation_params(), "ar_use_sampling": hybrid.ARParams().use_sampling}

    model = MAGNeT.from_pretrained(tiny_dir, device="cpu")
    model.set_generation_params(decoding_steps=[2, 1, 1, 1], top_k=5, hybrid_handoff="rectangle", rescore_weight=0.5)
    model.set_generation_params()
    assert model.params == DecodingParams() and model.rescore == rescoring.RescoreOptions()
    ar = hybrid.ARParams(cfg_coef=model.config.cfg_coef)   # the checkpoint's inference_coef
    assert model.hybrid == dataclasses.replace(hybrid.HybridOptions(), ar=ar)


def parsed(argv):
    if argv[0] == "edit":
        return cli.build_edit_parser().parse_intermixed_args(argv[1:])
    return cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", [["generate"], ["demo"], ["edit", "in.wav", "--region", "1:2"]])
def test_every_cli_decoding_default_is_the_dataclasses(argv):
    params = cli._generation_params(parsed(argv))
    params["decoding_steps"] = tuple(params["decoding_steps"])
    expected = dataclass_generation_params()
    if argv[0] == "demo":
        expected["duration"] = 2.0   # the demo's own short clip
    assert params == expected


def test_cli_choices_are_the_engines():
    actions = {a.dest: a for a in cli.build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    assert tuple(actions["engine"].choices) == ENGINES
    assert tuple(actions["span_arrangement"].choices) == SPAN_ARRANGEMENTS
    assert tuple(actions["span_scoring"].choices) == SPAN_SCORINGS
    assert tuple(actions["hybrid_handoff"].choices) == hybrid.HANDOFFS
    assert tuple(actions["hybrid_prefix_attention"].choices) == hybrid.PREFIX_ATTENTIONS
    assert tuple(actions["rescore_temperature"].choices) == rescoring.TEMPERATURES
    assert tuple(actions["rescore_fill"].choices) == rescoring.FILLS


def test_speech_settings_default_to_the_unmasking_loops():
    """speech CLI flags -> BaseInput -> UnmaskOptions: every step of the way the same defaults."""
    args = speech_cli.build_parser().parse_args(["tts", "hello", "--voice", "v.wav", "-o", "out.wav"])
    settings = speech_cli._settings(args)
    assert settings == {name: f.default for name, f in BaseInput.model_fields.items() if name != "output_text"}
    fixes = types.SimpleNamespace(_unmask_fixes=UnmaskOptions())
    assert PlayDiffusion._options(fixes, BaseInput(output_text="hello", **settings)) == UnmaskOptions()


def test_every_schema_option_defaults_to_the_dataclass():
    pytest.importorskip("fastapi")
    from magnet_engine.server.schema import OPTION_FIELDS, GenerateRequest, Settings, parse_request

    defaults = DecodingParams()
    assert set(OPTION_FIELDS) == {f.name for f in dataclasses.fields(DecodingParams)}
    for name in OPTION_FIELDS:
        field = GenerateRequest.model_fields[name]
        assert field.default is None   # omitted: the dataclass's default, which the description states
        assert field.description == f"default: {json.dumps(getattr(defaults, name))}", name

    # an omitted option parses to the dataclass's default
    config = types.SimpleNamespace(n_q=len(defaults.decoding_steps), card=2048)
    model = types.SimpleNamespace(config=config, max_duration=10.0, check_duration=lambda d, limit: d)
    _, params, _ = parse_request(model, Settings(max_decoding_steps=max(defaults.decoding_steps)),
                                 GenerateRequest(description="a"))
    assert params == defaults


def test_serve_and_load_test_defaults_are_the_services():
    pytest.importorskip("fastapi")
    from magnet_engine.server.routes.edit import EditLimits
    from magnet_engine.server.routes.stream import StreamLimits
    from magnet_engine.server.schema import Settings
    from magnet_engine.server.serve import SETTING_ARGS, build_parser

    args = build_parser().parse_args([])
    settings = Settings()
    assert {name: getattr(args, name) for name in SETTING_ARGS} == {name: getattr(settings, name)
                                                                     for name in SETTING_ARGS}
    assert args.max_stream_duration == StreamLimits().max_duration
    assert args.max_edit_upload_bytes == EditLimits().max_upload_bytes

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    seen = {}

    def capture(args):   # main(["--ray"]) hands its parsed arguments to main_ray: keep them instead
        seen.update(vars(args))
        return 0
    load_test.main_ray = capture
    load_test.main(["--ray"])
    assert tuple(seen["decoding_steps"]) == DecodingParams().decoding_steps
    assert (seen["max_batch"], seen["max_wait_ms"], seen["queue_size"]) == \
        (settings.max_batch, settings.max_wait_ms, settings.queue_size)
