"""The floor below model/: the rank -> (pp, tp) layout, process groups, the byte channel and the wire types."""
