"""CloneBox controller: fleet state and decisions."""
