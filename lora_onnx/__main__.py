"""``python -m lora_onnx`` runs the command line."""

import sys

try:
    from lora_onnx.cli.main import main
except KeyboardInterrupt:  # Ctrl-C while the libraries load: nothing started, nothing to clean up
    sys.stderr.write("lora-onnx: error: interrupted; nothing was written\n")
    sys.exit(130)

sys.exit(main())
