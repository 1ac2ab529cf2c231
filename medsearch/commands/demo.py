"""`medsearch demo`: the whole product on a fresh offline machine, in one command."""
