"""Engine integrations (layer: top). Each subpackage is loaded by its engine, never by ``import kvxfer``."""
