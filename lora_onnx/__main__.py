"""``python -m lora_onnx`` runs the command line."""

import sys

from lora_onnx.cli.main import main

sys.exit(main())
