"""Bin audit: does the photo agree with the recorded quantity?"""
