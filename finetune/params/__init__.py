"""Which parameter trains how: group rules, the assignment of each parameter, LoRA adapters and their peft files."""
