"""pgmux.pool"""
