import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()  # the "falling back to the reference kernel" notices

from delta_steering.engine.scoring import encode_examples  # noqa: E402
from tiny import make_examples, make_model, make_tokenizer, save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-mamba"))


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (real data for checks lives there)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def builtin_examples():
    """`load_task(name, shared tasks_hf).examples`, loaded once a session: hellaswag alone takes tens of
    seconds through lm-eval, and several modules check the same tasks."""
    import functools

    from delta_steering.data.tasks import load_task

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (real data for checks lives there)")
    return functools.cache(lambda name: load_task(name, str(SHARED_DATA / "tasks_hf")).examples)


@pytest.fixture(scope="session")
def lm_eval_docs():
    """lm-eval's own task object for a built-in task and the documents it evaluates, once a session."""
    import functools

    from handwritten_tasks import BUILTIN_TASKS
    from lm_eval_reference import lm_eval_task

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (real data for checks lives there)")

    @functools.cache
    def build(name):
        task = lm_eval_task(name, str(SHARED_DATA / "tasks_hf" / name / f"{BUILTIN_TASKS[name].split}.jsonl"))
        return task, list(task.test_docs() if task.has_test_docs() else task.validation_docs())

    return build


@pytest.fixture(scope="session")
def two_layer_model_dir(tmp_path_factory):
    """A 2-layer tiny model, for end-to-end runs on long real-data sequences."""
    return save_tiny(tmp_path_factory.mktemp("tiny-2-layer"), num_hidden_layers=2)


@pytest.fixture(scope="session")
def punkt(tmp_path_factory):
    """Make NLTK's punkt_tab findable: the real one from ../shared, else empty Punkt parameters (a
    valid untrained tokenizer; enough for tests that do not count sentences of real data)."""
    import nltk

    folder = SHARED_DATA / "nltk_data"
    if not (folder / "tokenizers" / "punkt_tab").is_dir():
        folder = tmp_path_factory.mktemp("nltk_data")
        english = folder / "tokenizers" / "punkt_tab" / "english"
        english.mkdir(parents=True)
        for name in ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"):
            (english / name).touch()
    nltk.data.path.insert(0, str(folder))
    yield folder
    nltk.data.path.remove(str(folder))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a script loads the model: the mistakes it tests must be caught before."""
    from delta_steering.model import loading as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the tiny models' ops are too small to gain from threads, and on
    a shared machine a second thread waiting for a busy core makes every op slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def examples():
    """Multiple-choice (shared contexts), acc_norm and greedy examples, as the built-in tasks make them."""
    return make_examples()


@pytest.fixture(scope="module")
def encoded(tokenizer, examples):
    return encode_examples(tokenizer, examples)
