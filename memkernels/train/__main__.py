"""`python -m memkernels.train` points to the train command. The trainer is a
library layer below the apps, so the command (which knows the recall world's
episodes and base LMs) lives in memkernels.apps.recall.train."""
import sys

sys.exit("memkernels.train is the training library; the command that trains a memory for a "
         "Hugging Face causal LM is\n    python -m memkernels.apps.recall.train --model DIR "
         "--out OUT\n(--help for its options; the memory is written to OUT/memory)")
