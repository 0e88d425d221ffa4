"""pgmux.stats"""
