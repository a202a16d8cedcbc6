"""peftbench's Hydra launchers (Hydra loads launcher classes only from the `hydra_plugins` namespace package)."""
