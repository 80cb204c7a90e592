"""One module per command: inject, apply (PEFT), merge, inject-mixed, slots, inspect, batch."""
