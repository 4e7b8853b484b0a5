"""Dataset loader of the ``hybridgen_choice_*`` tasks: the packaged multiple-choice suite.

The suite is one JSON Lines file shipped inside the package (``hybridgen/eval/data/choices.jsonl``,
read and checked by :func:`hybridgen.eval.choice.load_suite`). lm-eval resolves a relative
``data_files`` entry against the working directory, so the tasks load through
``custom_dataset: !function utils.load_choices`` instead: the file is found from the installed
package wherever lm-eval is started. ``--metadata '{"choices_file": "PATH"}'`` points the tasks
at another file of the same format.

lm-eval imports this file by its path, not as part of the package: imports here are absolute.
"""

from __future__ import annotations


def load_choices(kind: str, choices_file: str | None = None, **_metadata):
    """The suite's items of one ``kind`` as a ``DatasetDict`` with a single ``test`` split.

    lm-eval calls this with the task's ``dataset_kwargs`` (``kind``) and every metadata entry
    (the model arguments among them), hence ``**_metadata``.
    """
    import datasets

    from hybridgen.eval.choice import load_suite

    rows = [
        {"id": item.id, "kind": item.kind, "context": item.context, "choices": list(item.choices), "label": item.label}
        for item in load_suite(choices_file, kinds=kind)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
