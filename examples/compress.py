"""echoatt in one Python call: a faster student of a teacher, distilled back to quality, with its numbers.

    python examples/compress.py [TEACHER] [RECIPE.yaml]

TEACHER: a model folder, hub id, .gguf file or `default` (SmolLM2-135M, offline); RECIPE: options as `echoatt run
--config` takes them (configs/ has examples). The test suite runs this file on a tiny teacher.
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import echoatt

teacher = sys.argv[1] if len(sys.argv) > 1 else "default"
recipe = sys.argv[2] if len(sys.argv) > 2 else None

result = echoatt.compress(teacher, recipe=recipe, out="runs/compress")  # any `echoatt run` option as a keyword
print(result.summary.perplexity)  # validation perplexity: teacher, student before and after distillation
print(f"report: {result.report}")

student = result.student  # the distilled student: an ordinary transformers model
tokenizer = AutoTokenizer.from_pretrained(result.folder / "student-distilled")
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
print(tokenizer.decode(student.generate(ids, max_new_tokens=8, do_sample=False)[0]))

# A model object works too: echoatt.compress(model, tokenizer, ...). The saved student loads anywhere:
reloaded = AutoModelForCausalLM.from_pretrained(result.folder / "student-distilled")
