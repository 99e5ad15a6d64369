"""lm-evaluation-harness's own task objects, built offline from its YAML and a local data file: the
independent reference the project's task construction and scoring are checked against."""

import os

from handwritten_tasks import BUILTIN_TASKS

LM_EVAL_YAML = {
    "lambada_openai": "lambada/lambada_openai.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
}


def lm_eval_task(name: str, data_file: str):
    """lm-eval's ConfigurableTask for a built-in task, reading `data_file` instead of the Hub."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    split = BUILTIN_TASKS[name].split
    config = load_yaml(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", LM_EVAL_YAML[name]))
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: data_file}},
                  training_split=None, validation_split=split if split == "validation" else None,
                  test_split=split if split == "test" else None)
    return ConfigurableTask(config=config)

