"""The models a server serves: entries (what the operator asked for), families (how a checkpoint
directory becomes a loaded model), served models (a loaded model with its engine and vision stage),
and the registry that names them (app/models/registry.py)."""
