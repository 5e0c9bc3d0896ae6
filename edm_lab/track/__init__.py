"""edm_lab.track"""
